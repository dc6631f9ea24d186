"""The trained model, its EMA and the optimizer as checkpoint dicts and back, whatever their sharding, through
torch.distributed.checkpoint.state_dict (get_state_dict / set_state_dict), never by hand.

Three forms (trainer/checkpoint.py has the files):

    whole    what a single-file checkpoint holds: whole tensors in the plain nn.Linear layout, te.Linear's scaling
             state apart, the optimizer numbered by index (torch.optim's own state_dict)
    sharded  what a step_N.dcp folder holds: each rank's shards (or whole tensors under DDP) of the weights, the EMA
             and the optimizer moments keyed by parameter name, plus the param_groups and scaling state once

`whole_state` gathers the whole form from any layout (rank 0 gets it), `sharded_parts` gives the sharded form,
`load_sharded` reads a folder into any layout (DCP reshards), `load_whole_into_shards` a file into sharded modules.
Unsharded modules take a file as before (Trainer._load_tensors: load_module_state, Optimizer.load_state_dict), so
the DDP path is the one it always was.

`keep` (a LoRA run: trainer/lora.py's `kept`) selects what of the model and the EMA a checkpoint holds: the adapters,
never the frozen base, which is train.init_from's. Only those tensors are gathered, written and read; the optimizer
holds nothing else anyway.
"""

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from trainer import checkpoint
from trainer.precision import loadable_extra_state

Keep = Callable[[str], bool] | None


def whole_state(model: nn.Module, ema: nn.Module, opt: Optimizer, is_main: bool,
                keep: Keep = None) -> tuple[dict, dict, dict] | None:
    """(model, EMA, optimizer by index) of sharded modules, gathered into rank 0's CPU memory; every rank must
    call it, ranks other than 0 get None. Model and EMA keep te.Linear's `_extra_state` entries (split them)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        get_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if keep is None:
        model_state, optimizer = get_state_dict(model, opt, options=whole)
        ema_state = get_model_state_dict(ema, options=whole)
    else:  # gather the kept tensors alone, not the frozen base
        model_state, ema_state = _gathered(model, keep), _gathered(ema, keep)
        optimizer = get_optimizer_state_dict(model, opt, options=whole)
    return (model_state, ema_state, checkpoint.optimizer_by_index(optimizer)) if is_main else None


def _gathered(module: nn.Module, keep: Callable[[str], bool]) -> dict[str, Any]:
    """The kept entries of a sharded module's state, whole, on the CPU (every rank gathers each in turn)."""
    out = {}
    for name, value in module.state_dict().items():
        if keep(name):
            full = value.full_tensor() if hasattr(value, "full_tensor") else value
            out[name] = full.detach().cpu() if isinstance(full, torch.Tensor) else full
    return out


def _kept(state: dict[str, Any], keep: Keep) -> dict[str, Any]:
    return state if keep is None else {k: v for k, v in state.items() if keep(k)}


def sharded_parts(model: nn.Module, ema: nn.Module, opt: Optimizer, keep: Keep = None) -> tuple[dict, dict[str, Any]]:
    """(the tensors DCP writes: model, ema, optimizer moments by name; what meta.pt adds: optimizer_groups and,
    with TE layers, te_extra_state)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    model_state, optimizer = get_state_dict(model, opt)
    weights, model_extra = checkpoint.split_extra_state(_kept(model_state, keep))
    ema_weights, ema_extra = checkpoint.split_extra_state(_kept(get_model_state_dict(ema), keep))
    shared: dict[str, Any] = dict(optimizer_groups=optimizer["param_groups"])
    if model_extra or ema_extra:
        shared["te_extra_state"] = dict(model=model_extra, ema=ema_extra)
    return dict(model=weights, ema=ema_weights, optimizer=optimizer["state"]), shared


def load_sharded(model: nn.Module, ema: nn.Module, opt: Optimizer, path: Path, state: dict[str, Any],
                 keep: Keep = None) -> None:
    """A sharded checkpoint into this run's tensors (shards of any size, or whole ones) whatever the saved run's
    layout was; `state` is its opened form (trainer.checkpoint.open_sharded: the param_groups, scaling state)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    model_state, optimizer = get_state_dict(model, opt)  # allocates the moments, then overwritten
    weights, model_extra = checkpoint.split_extra_state(_kept(model_state, keep))
    ema_weights, ema_extra = checkpoint.split_extra_state(_kept(get_model_state_dict(ema), keep))
    target = dict(model=weights, ema=ema_weights, optimizer=optimizer["state"])
    checkpoint.load_sharded(path, target)
    saved = state.get("te_extra_state") or {}
    extra = loadable_extra_state(dict(model=own_extra(model_extra, saved.get("model")),
                                      ema=own_extra(ema_extra, saved.get("ema"))), str(path))
    partial = StateDictOptions(strict=keep is None)  # kept entries only: the frozen base stays as loaded
    set_state_dict(model, opt, model_state_dict=weights | extra["model"],
                   optim_state_dict=dict(state=target["optimizer"], param_groups=state["optimizer_groups"]),
                   options=partial)
    set_model_state_dict(ema, ema_weights | extra["ema"], options=partial)


def load_whole_into_shards(model: nn.Module, ema: nn.Module, opt: Optimizer, state: dict[str, Any],
                           keep: Keep = None) -> None:
    """A single-file checkpoint (whole tensors, the optimizer by index) into sharded modules: each rank keeps its
    shards of what it read."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    whole = StateDictOptions(full_state_dict=True, strict=keep is None)
    saved = state.get("te_extra_state") or {}
    weights, extra = {}, {}
    for module, key in ((model, "model"), (ema, "ema")):
        weights[key], inline = checkpoint.split_extra_state(state[key])
        own = {k: v for k, v in module.state_dict().items() if checkpoint.is_extra_state_key(k)}
        extra[key] = own_extra(own, inline | saved.get(key, {}))
    extra = loadable_extra_state(extra, "the checkpoint")
    for module, key in ((model, "model"), (ema, "ema")):
        set_model_state_dict(module, weights[key] | extra[key], options=whole)
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in opt.param_groups for p in group["params"]]
    set_optimizer_state_dict(model, opt, checkpoint.optimizer_by_name(state["optimizer"], order), options=whole)


def own_extra(own: dict[str, Any], saved: dict[str, Any] | None) -> dict[str, Any]:
    """te.Linear's `_extra_state` entries for a module whose own are `own`: the saved ones where the checkpoint has
    them, the module's own (unchanged) where it has none (TE then starts its scaling afresh, as load_module_state
    does), none for a module without TE layers. The caller passes them through precision.loadable_extra_state."""
    return {k: (saved or {}).get(k, v) for k, v in own.items()}
