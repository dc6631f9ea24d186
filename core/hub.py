"""Which sources a file may steer a loader to: hub ids (with a revision) and the bundled MiniLM, never a local path.

A checkpoint's metadata or a shard manifest records where its text encoder, tokenizer and VAE came from. A loader
given a local folder with an `auto_map` entry can be made to import code, and a loader given a path reads whatever
is there, so a recorded source is accepted only as a hub id that is not also a folder here; only the user chooses
a path (app/sources.py: --text-encoder, --tokenizer, --vae) or remote code (--trust-remote-code).
"""

import re
from pathlib import Path
from typing import Any

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
