"""Checkpoints: written atomically (temp file + rename), loaded with weights_only=True, newest K kept."""

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^step_(\d+)\.pt$")


def save_atomic(obj: dict, path: Path) -> None:
    """A crash at any moment leaves either the old file or the complete new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return ckpt_dir / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name)[1]))


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints, and delete half-written temporary files that a killed writer left
    (this process's own are renamed before prune runs, so every temporary file here is stale)."""
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    for stale in ckpt_dir.glob(".step_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)


def load(path: Path) -> dict:
    """Load a checkpoint without executing code; a clear error names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise RuntimeError(f"cannot load checkpoint {path}: {err}") from err


def load_model(path: Path, weights: str = "ema"):
    """Rebuild the model a training checkpoint describes and load its `ema` or `raw` weights.

    Returns (model in eval mode, metadata). Everything needed comes from the checkpoint itself.
    """
    state = load(path)
    meta = state.get("metadata")
    if not isinstance(meta, dict) or "model" not in meta:
        raise ValueError(f"{path}: no metadata.model; not a checkpoint written by this repository's trainer")
    return model_from_state(state, weights), meta


def model_from_state(state: dict, weights: str = "ema"):
    """The model a loaded checkpoint's metadata describes, with its `ema` or `raw` weights, in eval mode."""
    from models import ModelConfig, build_model

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    model = build_model(ModelConfig(**state["metadata"]["model"]))
    model.load_state_dict(state["ema" if weights == "ema" else "model"])
    return model.eval().requires_grad_(False)
