"""The portable identity of a tokenizer's or an encoder's files: what a shard manifest or a checkpoint records.

A source is recorded by what means the same on every machine, never by a local path (data/README.md, "Tokenizer
identity"): `id` is the bundled MiniLM's package id, a hub id with the `revision` actually read, or
`sha256:<hash of its files>` for a local folder (only the user can say where such a folder is); `sha256` hashes
the files that decide its output; `name` is for people to read. core/tokenizer.py records tokenizers this way and
data/features.py text encoders, each naming the files that matter to it.
"""

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.hub import BUNDLED_NAME, BUNDLED_TOKENIZER, default_tokenizer_path, is_bundled, is_hub_id


def files_sha256(folder: Path | str, patterns: Sequence[str]) -> str | None:
    """sha256 over the files of `folder` matching `patterns` (glob patterns or plain names), in name order, each
    fed as its name, a NUL, its length in bytes, a NUL, then its bytes (read in 16 MiB blocks: a T5-XXL is 9 GB);
    None when none is there."""
    folder = Path(folder)
    names = sorted({p.name for pattern in patterns for p in folder.glob(pattern) if p.is_file()})
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        path = folder / name
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
    return digest.hexdigest()


def _hub_snapshot(name: str, probes: Sequence[str], subfolder: str | None, revision: str | None) -> Path | None:
    """The cached snapshot folder (or its subfolder) holding the first of `probes` a load put in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    prefix = f"{subfolder}/" if subfolder else ""
    for filename in probes:
        found = try_to_load_from_cache(name, f"{prefix}{filename}", revision=revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


def source_identity(
    source: str, what: str, patterns: Sequence[str], probes: Sequence[str], revision: str | None = None,
    subfolder: str | None = None,
) -> dict[str, Any]:
    """{id, name, revision, sha256} of `source` (the bundled MiniLM, a local folder or a hub id), hashing the files
    that match `patterns` (files_sha256). A hub source is hashed from the local cache, found by the first of
    `probes` present there, when a load put it there; `what` names the kind in errors."""
    if is_bundled(source):
        folder = Path(default_tokenizer_path())
        return dict(id=BUNDLED_TOKENIZER, name=BUNDLED_NAME, revision=None, sha256=files_sha256(folder, patterns))
    if Path(source).is_dir():
        folder = Path(source) / (subfolder or "")
        digest = files_sha256(folder, patterns)
        if digest is None:
            raise ValueError(f"{what} folder {folder} holds none of {', '.join(patterns)}")
        return dict(id=f"sha256:{digest}", name=Path(source).resolve().name, revision=None, sha256=digest)
    if is_hub_id(source):
        snapshot = _hub_snapshot(source, probes, subfolder, revision)
        # The snapshot folder is named by its commit (one level up from a subfolder): the revision actually read.
        commit = (snapshot.parent if subfolder else snapshot).name if snapshot is not None else revision
        digest = files_sha256(snapshot, patterns) if snapshot is not None else None
        return dict(id=source, name=source, revision=commit, sha256=digest)
    raise ValueError(f"{what} {source!r} is neither a local folder nor a hub id (owner/name)")
