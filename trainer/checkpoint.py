"""Checkpoints: complete, atomic, loaded with weights_only=True, newest K kept; the RNG states they carry.

Atomic: a checkpoint is written to a temporary name in its folder, fsynced, renamed over the final name and the
folder fsynced, so a crash at any moment leaves either the previous checkpoint or the complete new one. A write
that fails (disk full, a signal) removes its temporary file. Temporary names carry the writer's host and pid:
`prune` removes only this process's own leftovers and those of dead processes on this host; the run lock
(trainer/run_lock.py) keeps a second live trainer out of the folder in the first place.

Portable across linear layouts: Transformer Engine's te.Linear adds a `<layer>._extra_state` entry (its FP8
scaling state) to a state dict, which a plain nn.Linear model rejects. The trainer saves `model` and `ema` in the
plain layout, which every tool loads, and keeps the FP8 scaling state beside them under `te_extra_state`
({"model": {...}, "ema": {...}}) for resuming into an FP8 run (trainer/loop.py); `split_extra_state` also
cleans checkpoints written the other way (older FP8 runs, reparameterize.py to-te).
"""

import os
import random
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch import Tensor

_NAME = re.compile(r"^step_(\d+)\.pt$")
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)$")
EXTRA_STATE = "_extra_state"
"""The suffix of the state-dict entry a module with get_extra_state (te.Linear) adds."""


class CheckpointError(ValueError, RuntimeError):
    """A file that is not a loadable checkpoint of this repository, or not the one a command needs (a ValueError
    for callers that validate input, a RuntimeError for those that catch load failures)."""


def _host() -> str:
    return socket.gethostname().replace("-", "_") or "host"


def temp_name(path: Path) -> Path:
    """This process's temporary name for `path` (same folder, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{_host()}-{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the directory entry lives in the folder's own blocks)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles: the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Write `path` through a temporary file and a rename; on any failure the temporary file is removed and the
    previous `path`, if any, is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {path}: {err.strerror or err} (nothing was left half-written; "
                          "the previous file, if any, is unchanged)") from err
        raise
    fsync_dir(path.parent)


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save `obj` to `path` atomically (see write_atomic)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step a `step_XXXXXXXX.pt` name records, or None for another name."""
    match = _NAME.match(Path(path).name)
    return int(match[1]) if match else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The `step_*.pt` files of a folder, oldest step first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if _NAME.match(p.name)), key=checkpoint_step)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """Temporary checkpoint files left by a writer that is gone: this process's own (a failed write) or a
    dead process's on this host. A live writer's, or one from another host, is never listed."""
    stale = []
    for tmp in Path(ckpt_dir).glob(".step_*.pt.tmp-*"):
        match = _TEMP.match(tmp.name)
        if match is None or match["host"] != _host():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            stale.append(tmp)
    return stale


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove stale temporary files (stale_temporaries)."""
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in stale_temporaries(ckpt_dir):
        stale.unlink(missing_ok=True)


def load(path: Path) -> dict:
    """Load a checkpoint without executing code (weights_only=True); a clear error names the file.

    torch's own message for a refused file suggests weights_only=False, i.e. running the file's code: that
    advice is never passed on."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"cannot load checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, another format, or a pickle that weights_only refuses
        reason = str(err).split("\n", 1)[0].strip() or type(err).__name__
        if "weights_only" in reason or "Weights only load failed" in str(err):
            reason = "it holds Python objects other than tensors and plain containers, which are never loaded"
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: it holds a {type(state).__name__}, not a dict")
    return state


def resolve(path: str | Path, what: str) -> Path:
    """A checkpoint file, or a run's out_dir or its checkpoints/ folder (then its newest checkpoint).
    FileNotFoundError names `what` (the key or flag) when there is none."""
    p = Path(path)
    if p.is_file():
        return p
    for folder in (p / "checkpoints", p):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    raise FileNotFoundError(f"{what}={str(path)!r}: not a checkpoint file nor a folder holding step_*.pt checkpoints")


# ---- linear layouts -----------------------------------------------------------------------------------------


def is_extra_state_key(key: str) -> bool:
    return key.endswith("." + EXTRA_STATE) or key == EXTRA_STATE


def split_extra_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the weights in the plain nn.Linear layout, the `_extra_state` entries) of a model state dict."""
    weights = {k: v for k, v in state.items() if not is_extra_state_key(k)}
    extra = {k: v for k, v in state.items() if is_extra_state_key(k)}
    return weights, extra


def model_weights(ckpt: dict, which: str) -> dict[str, Tensor]:
    """The plain-layout `model` ("raw") or `ema` weights of a loaded checkpoint, whichever layout it was saved in."""
    key = {"ema": "ema", "raw": "model", "model": "model"}.get(which)
    if key is None:
        raise ValueError(f"weights must be 'ema' or 'raw', got {which!r}")
    state = ckpt.get(key)
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint holds no '{key}' weights")
    return split_extra_state(state)[0]


def load_module_state(module: torch.nn.Module, weights: dict[str, Tensor], extra: dict[str, Any] | None = None):
    """Load plain-layout `weights` (and, for te.Linear layers, their saved FP8 scaling state `extra`) into
    `module`, whichever linear layout it runs. Missing `_extra_state` entries are fine (TE starts its scaling
    afresh); any other mismatch raises load_state_dict's error."""
    own_extra = {k for k in module.state_dict() if is_extra_state_key(k)}
    state = dict(weights) | {k: v for k, v in (extra or {}).items() if k in own_extra}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_extra_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(f"state does not fit {type(module).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


# ---- RNG states ---------------------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """Global RNG states: the loop draws from its own generators, but code it calls may use these."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                       gauss=gauss)
    states = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- rebuilding a model -------------------------------------------------------------------------------------


def load_model(path: Path, weights: str = "ema"):
    """Rebuild the model a training checkpoint describes and load its `ema` or `raw` weights.

    Returns (model in eval mode, metadata). Everything needed comes from the checkpoint itself.
    """
    state = load(path)
    meta = state.get("metadata")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: no metadata.model; not a checkpoint written by this repository's trainer")
    return model_from_state(state, weights), meta


def model_from_state(state: dict, weights: str = "ema"):
    """The model a loaded checkpoint's metadata describes, with its `ema` or `raw` weights (plain layout, so an
    FP8-trained checkpoint loads too), in eval mode."""
    from models import ModelConfig, build_model

    model = build_model(ModelConfig(**state["metadata"]["model"]))
    model.load_state_dict(model_weights(state, weights))
    return model.eval().requires_grad_(False)
