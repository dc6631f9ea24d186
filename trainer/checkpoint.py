"""The trainer's checkpoint functions: core/checkpoint.py's reading, atomic writing and layouts (the single-file
format every tool reads), the global RNG states, and the sharded format of train.checkpoint_format=sharded.

A sharded checkpoint is a folder `checkpoints/step_XXXXXXXX.dcp/`:

    .metadata, __R_0.distcp   torch.distributed.checkpoint [DCP]: `model`, `ema` and the optimizer moments
                              `optimizer` (keyed by parameter name), each rank writing the shards it holds
    meta.pt                   once, by rank 0: step, history, bad-step count, extra, config, metadata, the
                              optimizer's param_groups and the scheduler, TE's scaling state, world size, parallel
    rank_RRRRR.pt             per rank: its loader state and RNG states

Only tensors go through DCP: its loader reads non-tensor entries with an unrestricted pickle, which would let a
checkpoint run code; everything else is in .pt files read with weights_only=True, and DCP's own `.metadata`
pickle is read with an unpickler that builds only DCP's metadata records, named one by one (`_SafeReader`), then
checked against the folder: every chunk in a `__R_N.distcp` file of this folder, inside its size, so a `.metadata`
can neither choose which files are read nor make a load allocate more than the files hold, and a missing or
truncated data file stops the load naming the folder before any tensor is read.

Atomic: every rank writes into `.step_XXXXXXXX.dcp.partial/`, and rank 0 renames it to its final name once the
whole checkpoint is written (DCP's save returns on rank 0 after every rank's shards are on disk), so a folder with
a final name is complete; a kill at any moment leaves the previous checkpoint as the newest. `prune` removes
partial folders no live save is writing (the run lock, trainer/run_lock.py, keeps other runs out of the folder).

Resharding: DCP stores every tensor with its global shape and the chunks each rank wrote, and a load reads into
whatever the loading run holds (a shard of another size, or a whole tensor), so a checkpoint saved on N ranks
under any train.parallel resumes on M ranks under any other. `python -m trainer.consolidate` writes the single-file
form, the same dict a DDP run saves (`read_full` + `optimizer_by_index`).
"""

import logging
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.checkpoint import (  # noqa: F401 (the trainer's checkpoint API)
    EXTRA_STATE,
    WEIGHTS,
    CheckpointError,
    checkpoint_path,
    checkpoint_step,
    is_extra_state_key,
    load_model,
    load_module_state,
    model_from_state,
    model_weights,
    save_atomic,
    split_extra_state,
    stale_temporaries,
)
from core.checkpoint import list_checkpoints as list_files
from core.checkpoint import load as load_file
from core.checkpoint import prune as prune_files
from core.checkpoint import resolve as resolve_file
from core.files import fsync_dir

log = logging.getLogger(__name__)
_SHARDED = re.compile(r"^step_(\d+)\.dcp$")
_PARTIAL = re.compile(r"^\.step_(\d+)\.dcp\.partial$")
META = "meta.pt"
TENSOR_KEYS = ("model", "ema", "optimizer")
"""What a sharded checkpoint keeps in DCP; the rest of a training checkpoint is in meta.pt and the rank files."""


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ---- names and folders --------------------------------------------------------------------------------------


def sharded_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.dcp"


def partial_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.partial")


def is_sharded(path: Path) -> bool:
    path = Path(path)
    return path.is_dir() and _SHARDED.match(path.name) is not None


def step_of(path: Path) -> int | None:
    """The step a `step_XXXXXXXX.pt` file or `step_XXXXXXXX.dcp` folder records."""
    match = _SHARDED.match(Path(path).name)
    return int(match[1]) if match else checkpoint_step(path)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The complete checkpoints of a folder, files and sharded folders, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    sharded = [p for p in ckpt_dir.iterdir() if is_sharded(p)] if ckpt_dir.is_dir() else []
    return sorted([*list_files(ckpt_dir), *sharded], key=lambda p: (step_of(p), p.suffix == ".dcp"))


def resolve(path: str | Path, what: str) -> Path:
    """A checkpoint (file or sharded folder), or a run's out_dir or its checkpoints/ folder (then its newest)."""
    return resolve_file(path, what, lister=list_checkpoints, is_checkpoint=lambda p: p.is_file() or is_sharded(p),
                        empty="a folder with no checkpoints (step_*.pt or step_*.dcp) in it")


def load(path: Path) -> dict:
    """A training checkpoint: a file's contents (core/checkpoint.py), or a sharded folder opened (open_sharded)."""
    return open_sharded(Path(path)) if is_sharded(path) else load_file(path)


def prune(ckpt_dir: Path, keep: int, writing: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints of either form; remove stale temporary files and every partial sharded
    folder but `writing` (the one an asynchronous save is still filling)."""
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    prune_files(ckpt_dir, 0)  # keep=0: its own list (files only) was handled above; this removes stale temporaries
    for partial in Path(ckpt_dir).glob(".step_*.dcp.*") if Path(ckpt_dir).is_dir() else []:
        if partial != writing and (_PARTIAL.match(partial.name) or partial.name.endswith(".old")):
            shutil.rmtree(partial, ignore_errors=True)


# ---- the global RNG states ----------------------------------------------------------------------------------


def rng_states(device: torch.device | str | None = None) -> dict[str, Any]:
    """Global RNG states: the loop draws from its own generators, but code it calls may use these. With CUDA, the
    state of `device`'s generator (None: the current CUDA device's, when there is one), that device's only: a rank
    runs on one GPU, and its checkpoint must resume where other GPUs, or fewer, are visible (a state per visible
    device, torch.cuda.get_rng_state_all, could not be restored on fewer: set_rng_state_all indexes them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                       gauss=gauss)
    states = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    device = _cuda_device(device)
    if device is not None:
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device | str | None = None) -> None:
    """`rng_states`' states back, the CUDA one into `device`'s generator (None: the current CUDA device's).
    Checkpoints written before kept one CUDA state per visible device (a list): the entry at `device`'s index is
    restored, or none when the saving run saw fewer devices (the loop's own draws never depend on it)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    device, cuda = _cuda_device(device), states.get("cuda")
    if device is None or cuda is None:
        return
    if isinstance(cuda, list | tuple):
        if device.index >= len(cuda):
            log.warning("the checkpoint holds CUDA RNG states of %d devices, none for %s: its global CUDA RNG "
                        "stays as this run seeded it", len(cuda), device)
            return
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda, device)


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device whose RNG a run keeps, with its index; None for a CPU run."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


# ---- the data position on another world size -----------------------------------------------------------------


def continue_loader(saved: dict, world_size: int, num_workers: int, batch_size: int) -> dict:
    """The loader state (data/loader.py) that continues, on `world_size` ranks, from the global sample count of
    `saved`, a state saved on saved['world_size'] ranks: each rank starts at its share of that count. `saved`
    itself when the world size is the same (the exact resume). The order of what follows differs from the one the
    saved run would have seen (every rank's slot covers another range of the epoch's order)."""
    from data.loader import samples_per_epoch

    saved_world = int(saved.get("world_size", world_size))
    if saved_world == world_size:
        return saved
    per_saved_rank = saved.get("samples")
    if per_saved_rank is None:
        per_saved_rank = int(saved["epoch"]) * samples_per_epoch(
            int(saved["num_records"]), saved_world, int(saved.get("num_workers", 0))) + int(saved["position"])
    per_rank = int(per_saved_rank) * saved_world // world_size
    epoch, position = divmod(per_rank, samples_per_epoch(int(saved["num_records"]), world_size, num_workers))
    return dict(saved, samples=per_rank, epoch=epoch, position=position, world_size=world_size,
                num_workers=num_workers, batch_size=batch_size)


# ---- optimizer states by index and by name ------------------------------------------------------------------


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """torch.optim's state dict (parameters numbered 0.. in param_groups order) keyed by parameter name instead,
    the form torch.distributed.checkpoint.state_dict reads; `names[i]` is parameter i's name."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return dict(state={names[i]: s for i, s in state["state"].items()}, param_groups=groups)


def optimizer_by_index(state: dict) -> dict:
    """The inverse of optimizer_by_name: the numbering torch.optim.Optimizer.state_dict() writes (parameters in
    param_groups order)."""
    order = [name for g in state["param_groups"] for name in g["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    return dict(state={index[n]: state["state"][n] for n in order if n in state["state"]}, param_groups=groups)


# ---- reading sharded checkpoints ----------------------------------------------------------------------------


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
    state = load_file(path / META)
    own = path / rank_file(rank)
    state |= {k: v for k, v in load_file(own if own.is_file() else path / rank_file(0)).items()
              if k in ("loader", "rng")}
    return state | {key: ShardedEntry(path, key) for key in TENSOR_KEYS}


# ---- writing sharded checkpoints ----------------------------------------------------------------------------


class ShardedWriter:
    """Writes step_N.dcp folders (module docstring), synchronously or, with `asynchronous`, through
    dcp.async_save: the call returns once the tensors are copied to host memory, the writing runs in a thread,
    and the folder is renamed to its final name when the next save starts or `wait()` is called."""

    def __init__(self, ckpt_dir: Path, env, keep: int, asynchronous: bool = False):
        import torch.distributed as dist

        self.ckpt_dir, self.env, self.keep, self.asynchronous = Path(ckpt_dir), env, keep, asynchronous
        self.pending: tuple[Future, Path, Path] | None = None
        # Its own gloo group: the writing thread's collectives must not interleave with the training step's.
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def save(self, step: int, tensors: dict, shared: dict, own: dict) -> Path:
        """Write one checkpoint; every rank calls it. `tensors` go through DCP, `shared` (rank 0's) to meta.pt,
        `own` (this rank's) to its rank file."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = sharded_path(self.ckpt_dir, step)
        tmp = partial_path(final)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a dead save's leftovers (the run lock: no live one)
        self.env.barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        save_atomic(own, tmp / rank_file(self.env.rank))
        if self.env.is_main:
            save_atomic(shared, tmp / META)
        if self.asynchronous:
            self.pending = (dcp.async_save(tensors, checkpoint_id=tmp, process_group=self.group), tmp, final)
        else:
            with warnings.catch_warnings():  # DCP warns when there is no process group (one plain process)
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(tensors, checkpoint_id=tmp)
            self._complete(tmp, final)
        return final

    def wait(self) -> None:
        """Let the asynchronous save in flight finish, and give it its final name."""
        if self.pending is not None:
            future, tmp, final = self.pending
            self.pending = None
            future.result()
            self._complete(tmp, final)

    def _complete(self, tmp: Path, final: Path) -> None:
        if not self.env.is_main:
            return
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a rerun): the new one replaces it, never half of it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        prune(self.ckpt_dir, self.keep)


# ---- the metadata record ----------------------------------------------------------------------------------


def metadata_record(cfg: DictConfig, spec, mcfg, conditioning, n_params: int, converted: int) -> dict:
    """What every tool reads from a checkpoint to use it with no other flag (app/pipeline.py, reparameterize.py)."""
    t = cfg.train
    return dict(
        model=mcfg.to_dict(), family=mcfg.family, size=mcfg.size, name=mcfg.name, stage=cfg.stage,
        parameters=n_params, prediction=t.prediction, space="pixel" if spec.vae.get("id") == "identity" else "latent",
        vae=dict(spec.vae, kind=cfg.vae.kind, name_or_path=cfg.vae.name_or_path, subfolder=cfg.vae.subfolder),
        latent_shape=list(spec.latent_shape), image_size=spec.image_size,
        text_encoder=OmegaConf.to_container(cfg.text_encoder, resolve=True) if spec.kind == "text" else None,
        sampling=dict(steps=t.preview.steps, cfg_scale=t.preview.cfg_scale, alpha=t.preview.alpha),
        data=str(cfg.data.path), linear_layout="torch", trained_linear_layout="te" if converted else "torch",
        **conditioning.metadata(),
    )
