"""The trainer's checkpoint functions: core/checkpoint.py's reading, atomic writing and layouts (the format is
shared with every tool), plus what only a training run saves and restores, the global RNG states."""

import random
from typing import Any

import numpy as np
import torch

from core.checkpoint import (  # noqa: F401 (the trainer's checkpoint API)
    EXTRA_STATE,
    WEIGHTS,
    CheckpointError,
    checkpoint_path,
    checkpoint_step,
    is_extra_state_key,
    list_checkpoints,
    load,
    load_model,
    load_module_state,
    model_from_state,
    model_weights,
    prune,
    resolve,
    save_atomic,
    split_extra_state,
    stale_temporaries,
)


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
