"""Reading a sharded checkpoint, a `step_XXXXXXXX.dcp` folder, safely: the part of the one checkpoint surface
(core/checkpoint.py: `load`, `resolve`, `list_checkpoints`) that opens the sharded form. The trainer writes it
(trainer/checkpoint.py: ShardedWriter); this reader needs nothing of the trainer, only torch.distributed.checkpoint
[DCP], so it lives on the inference floor with the file reader.

A sharded checkpoint is a folder:

    .metadata, __R_N.distcp   DCP: `model`, `ema` and the optimizer moments `optimizer` (keyed by parameter name),
                              each rank writing the shards it holds
    meta.pt                   once, by rank 0: step, history, bad-step count, extra, config, metadata, the
                              optimizer's param_groups and the scheduler, TE's scaling state, world size, parallel
    rank_RRRRR.pt             per rank: its loader state and RNG states

Only tensors go through DCP: its loader reads non-tensor entries with an unrestricted pickle, which would let a
checkpoint run code; everything else is in .pt files read with weights_only=True, and DCP's own `.metadata`
pickle is read with an unpickler that builds only DCP's metadata records, named one by one (`_SafeReader`), then
checked against the folder: every chunk in a `__R_N.distcp` file of this folder, inside its size, so a `.metadata`
can neither choose which files are read nor make a load allocate more than the files hold, and a missing or
truncated data file stops the load naming the folder before any tensor is read.

Resharding: DCP stores every tensor with its global shape and the chunks each rank wrote, and a load reads into
whatever the loading process holds (a shard of another size, or a whole tensor): `load_sharded` into a training
run's tensors, `read_full` whole tensors in one process (what `python -m trainer.consolidate` and train.init_from
read).
"""

import pickle
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from core.checkpoint import CheckpointError, load

META = "meta.pt"
TENSOR_KEYS = ("model", "ema", "optimizer")
"""What a sharded checkpoint keeps in DCP; the rest of a training checkpoint is in meta.pt and the rank files."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


_SHARD_FILE = re.compile(r"^__\d+_\d+\.distcp$")
"""The data files DCP's FileSystemWriter writes: f"__{rank}_{count}.distcp" (torch/distributed/checkpoint/
filesystem.py: _FileSystemWriter.prepare_global_plan's prefix, write_data's gen_file)."""
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "TensorStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "BytesStorageMetadata"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),  # how torch pickles a layout: a lookup by name
    "pathlib": frozenset({"PosixPath"}),  # StorageMeta.checkpoint_id when the save was given a Path
}
"""Every class a .metadata written by dcp.save holds, by name (torch 2.13: metadata.py's Metadata and the records it
nests, filesystem.py's _StorageInfo per stored chunk, torch.Size, dtypes, layouts; BytesStorageMetadata only so a
non-tensor entry is refused by name). Nothing else is built: torch.Tensor, which filesystem.py imports, would let a
.metadata allocate any amount of memory, and the planner's classes run code of their own."""


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's `.metadata` is a pickle; this builds only the records listed in _METADATA_CLASSES and torch's dtypes,
    and refuses anything else, so reading it runs no code and allocates nothing large."""

    def find_class(self, module: str, name: str):
        import importlib

        if name in _METADATA_CLASSES.get(module, ()):
            return getattr(importlib.import_module(module), name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):
            return vars(torch)[name]
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata; refused")


def _reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = _metadata(path)
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _SafeReader(path)


def _metadata(path: Path):
    """DCP's metadata record of a sharded checkpoint, read safely and checked against the folder (_check_metadata);
    CheckpointError naming the folder when it is unreadable, names anything else, or does not fit its files."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    try:
        with open(Path(path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
            KeyError, MemoryError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: its .metadata is unreadable ({err})") from None
    problem = _check_metadata(Path(path), metadata)
    if problem:
        raise CheckpointError(f"cannot load checkpoint {path}: {problem} (damaged, or not written by this trainer)")
    if metadata.storage_meta is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def _is_shape(value, ndim: int | None = None) -> bool:
    return (isinstance(value, torch.Size) and (ndim is None or len(value) == ndim)
            and all(isinstance(n, int) and n >= 0 for n in value))


def _check_metadata(folder: Path, metadata) -> str | None:
    """What is wrong with a .metadata read from `folder`, or None. Every entry is a tensor whose chunks lie inside
    it, each stored once in a plain data file of this folder (_check_storage); so the tensors it declares hold no
    more bytes than the files do, and a missing or truncated file is found here, before anything is read."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

    if type(metadata) is not Metadata or not isinstance(metadata.state_dict_metadata, dict):
        return "its .metadata is not DCP's Metadata record"
    if not isinstance(metadata.storage_meta, StorageMeta | None):
        return "its .metadata has a malformed storage_meta"
    entries, planner, storage = metadata.state_dict_metadata, metadata.planner_data, metadata.storage_data
    wrong = [k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata)]
    if wrong:
        return f"non-tensor entries {wrong[:3]} (never unpickled)"
    if not isinstance(planner, dict) or not isinstance(storage, dict):
        return "its .metadata has no planner_data or storage_data tables"
    problem = _check_storage(folder, storage)
    for fqn, item in entries.items():
        if problem:
            return problem
        where = planner.get(fqn)
        if not (isinstance(fqn, str) and isinstance(where, tuple | list) and where
                and all(isinstance(w, str | int) for w in where)):
            return f"its .metadata has no valid planner entry for {str(fqn)[:80]!r}"
        problem = _check_tensor(fqn, item, storage)
    return problem


def _check_storage(folder: Path, storage: dict) -> str | None:
    """Every stored record: in a file named as DCP names them, present in `folder` (no path, no link), inside its
    size, sharing no bytes with another, untransformed (DCP's optional compression, never written here)."""
    from itertools import pairwise

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import MetadataIndex

    files: dict[str, list[tuple[int, int]]] = {}
    for key, info in storage.items():
        if not isinstance(key, MetadataIndex) or type(info) is not _StorageInfo:
            return "its .metadata's storage_data holds records other than DCP's"
        name = info.relative_path
        if not isinstance(name, str) or not _SHARD_FILE.match(name):
            return f"its .metadata names the data file {str(name)[:80]!r}, not a __R_N.distcp file of the folder"
        if not (isinstance(info.offset, int) and isinstance(info.length, int) and info.offset >= 0
                and info.length >= 0):
            return f"its .metadata gives {name} an invalid byte range"
        if info.transform_descriptors:
            return f"its .metadata asks for transforms {list(info.transform_descriptors)[:3]} (never written here)"
        files.setdefault(name, []).append((info.offset, info.offset + info.length))
    for name, ranges in files.items():
        data = folder / name
        if data.is_symlink() or not data.is_file():
            return f"its data file {name} is missing"
        size = data.stat().st_size
        ranges.sort()
        if ranges[-1][1] > size:
            return f"its data file {name} holds {size} bytes, but .metadata stores chunks up to byte {ranges[-1][1]}"
        if any(b[0] < a[1] for a, b in pairwise(ranges)):
            return f"its .metadata stores overlapping chunks in {name}"
    return None


def _check_tensor(fqn: str, item, storage: dict) -> str | None:
    """One tensor's record: a dtype, a shape, chunks inside it each with its own stored record of at least the
    chunk's bytes, and no more elements than its chunks store."""
    import math

    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties

    if type(item.properties) is not TensorProperties or not isinstance(item.properties.dtype, torch.dtype) \
            or not _is_shape(item.size) or not isinstance(item.chunks, list):
        return f"its .metadata describes {fqn} with a malformed record"
    stored, seen = 0, set()
    for chunk in item.chunks:
        if type(chunk) is not ChunkStorageMetadata or not _is_shape(chunk.offsets, len(item.size)) \
                or not _is_shape(chunk.sizes, len(item.size)) or tuple(chunk.offsets) in seen \
                or any(o + n > d for o, n, d in zip(chunk.offsets, chunk.sizes, item.size, strict=True)):
            return f"its .metadata gives {fqn} a chunk outside its shape {list(item.size)} (or twice)"
        seen.add(tuple(chunk.offsets))
        info = storage.get(MetadataIndex(fqn, chunk.offsets))
        if info is None:
            return f"its .metadata stores no data for a chunk of {fqn}"
        nbytes = math.prod(chunk.sizes) * item.properties.dtype.itemsize
        if nbytes > info.length:
            return f"its .metadata gives a chunk of {fqn} {nbytes} bytes in a record of {info.length}"
        stored += nbytes
    if math.prod(item.size) * item.properties.dtype.itemsize > stored:
        return f"its .metadata declares {fqn} of shape {list(item.size)}, larger than the chunks stored for it"
    return None


def sharded_keys(path: Path) -> dict[str, tuple]:
    """{flattened key: (top-level key, name, ...)} of every tensor a sharded checkpoint's DCP part holds."""
    metadata = _metadata(path)
    return {k: tuple(metadata.planner_data[k]) for k in metadata.state_dict_metadata}


def load_sharded(path: Path, target: dict, no_dist: bool = False) -> None:
    """Read a sharded checkpoint's tensors into `target` (nested dicts of tensors or DTensors of any sharding) in
    place; every key of `target` must be in the checkpoint (CheckpointError naming the first missing). A data file
    that cannot be read (damaged where its size does not show it) is a CheckpointError naming the folder, on every
    rank (DCP gathers the ranks' failures)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    have = {".".join(map(str, k)) for k in sharded_keys(path).values()}
    missing = [k for k in _flat_keys(target) if k not in have]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not hold {missing[:5]}: not the model this run trains "
                              "(or saved by another version of it)")
    try:
        with warnings.catch_warnings():  # DCP warns that no_dist means one process: that is what was asked for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(target, storage_reader=_reader(path), no_dist=no_dist)
    except CheckpointException as err:  # a BaseException: each failed rank's exception, with its traceback
        rank, (cause, _) = next(iter(sorted(err.failures.items())))
        raise CheckpointError(f"cannot load checkpoint {path}: rank {rank} could not read its tensors "
                              f"({type(cause).__name__}: {_first_line(cause)}); its data files are damaged") from None
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError, AssertionError) as err:
        raise CheckpointError(f"cannot load checkpoint {path}: its tensors could not be read "
                              f"({type(err).__name__}: {_first_line(err)}); its data files are damaged") from None


def _first_line(err: BaseException) -> str:
    """The cause in one line; torch.load's advice to retry with weights_only=False (running the file's code) is
    never passed on."""
    if "Weights only load failed" in str(err):
        return "its bytes are not a tensor record"
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def read_full(path: Path, keys: tuple[str, ...] = TENSOR_KEYS) -> dict:
    """The whole tensors under `keys` of a sharded checkpoint, in this process alone (no collective): what
    consolidation and train.init_from read."""
    metadata = _metadata(path)
    target: dict = {}
    for flat, item in metadata.state_dict_metadata.items():
        where = tuple(metadata.planner_data[flat])
        if where[0] in keys:
            _put(target, where, torch.empty(item.size, dtype=item.properties.dtype))
    load_sharded(path, target, no_dist=True)
    return target


def _put(tree: dict, where: tuple, value) -> None:
    for part in where[:-1]:
        tree = tree.setdefault(part, {})
    tree[where[-1]] = value


def _flat_keys(tree: Mapping, prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _flat_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


class ShardedEntry(Mapping):
    """`model`, `ema` or `optimizer` of an opened sharded checkpoint: the trainer loads it shard by shard
    (`path`, `key`); anything else that reads it as a dict (train.init_from) gets the whole tensors, read once."""

    def __init__(self, path: Path, key: str):
        self.path, self.key, self._full = Path(path), key, None

    def _tensors(self) -> dict:
        if self._full is None:
            self._full = read_full(self.path, (self.key,)).get(self.key, {})
        return self._full

    def __getitem__(self, name):
        return self._tensors()[name]

    def __iter__(self):
        return iter(self._tensors())

    def __len__(self) -> int:
        return len(self._tensors())


def open_sharded(path: Path, rank: int = 0) -> dict:
    """A sharded checkpoint as a training-checkpoint dict: meta.pt's entries, `rank`'s loader and RNG states (rank
    0's when it has none), and ShardedEntry for model, ema and optimizer. CheckpointError naming the folder when
    incomplete or damaged: the .metadata is checked against the data files here (_metadata), so a missing or
    truncated file is found before a run, consolidate or train.init_from reads any tensor."""
    path = Path(path)
    for needed in (".metadata", META, rank_file(0)):
        if not (path / needed).is_file():
            raise CheckpointError(f"cannot load checkpoint {path}: no {needed} in it (not a complete sharded "
                                  "checkpoint)")
    _metadata(path)
    state = load(path / META)
    own = path / rank_file(rank)
    state |= {k: v for k, v in load(own if own.is_file() else path / rank_file(0)).items()
              if k in ("loader", "rng")}
    return state | {key: ShardedEntry(path, key) for key in TENSOR_KEYS}

