"""The Trainer's state as a dict of stateful parts, as torchtitan's checkpointer keeps it: each part saves and
restores itself, and a checkpoint of either form is the parts' states laid out in that form.

    model, ema   ModuleState      the trained weights and their average (a LoRA run: the adapters only, `keep`)
    optimizer    OptimizerState   AdamW's moments and param groups
    scheduler    the LambdaLR itself
    loader       LoaderState      the data position (each rank's; on another world size, the same global count)
    rng          RngState         this rank's global RNG states
    run          RunState         step, loss history, bad steps in a row, extra values

Every part has state_dict / load_state_dict. For the tensor parts that is the form torch.distributed.checkpoint
[DCP] saves and loads in place: this rank's shards under FSDP2 / HSDP, the tensors themselves otherwise, the
optimizer keyed by parameter name. They also give the whole form a single file holds (`full_state_dict`, gathered
into rank 0's CPU memory when sharded; `load_full_state_dict`, each rank keeping its shards of what it reads), through
torch.distributed.checkpoint.state_dict (get_/set_model_state_dict, get_/set_optimizer_state_dict), never by hand.

`TrainingState` lays the parts out (the formats are core/checkpoint.py's and core/sharded_checkpoint.py's):

    file     {model, ema, optimizer (numbered by index, as torch.optim saves it), scheduler, step, history,
             bad_in_row, extra, config, metadata, loader, rng} and, with TE layers, te_extra_state
    sharded  DCP: {model, ema, optimizer: the moments by name}; meta.pt (rank 0): optimizer_groups, te_extra_state,
             the run's entries, config, metadata, scheduler, world size, parallel; rank_RRRRR.pt: loader, rng

Both keep `model` and `ema` in the plain nn.Linear layout and te.Linear's scaling state (`_extra_state`) apart under
`te_extra_state`, which a resume hands back through precision.loadable_extra_state (TE >= 2.18 refuses to unpickle
it unless the user opts in). A file resumes into sharded modules and a folder into whole ones: DCP reshards.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from core import checkpoint as ckpt
from core.sharded_checkpoint import ShardedEntry, load_sharded, rank_file
from trainer import lora as lora_training
from trainer.checkpoint import continue_loader, optimizer_by_index, optimizer_by_name, restore_rng_states, rng_states
from trainer.precision import loadable_extra_state

log = logging.getLogger(__name__)
Keep = Callable[[str], bool] | None
TENSOR_PARTS = ("model", "ema", "optimizer")
"""The parts a sharded checkpoint keeps in DCP; the others are plain values in both forms."""


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def _kept(state: dict[str, Any], keep: Keep) -> dict[str, Any]:
    return state if keep is None else {k: v for k, v in state.items() if keep(k)}


class ModuleState:
    """`model` or `ema`: a module's weights and te.Linear's scaling state, whatever its sharding; `keep` (a LoRA run:
    trainer/lora.py's `kept`) selects what a checkpoint holds, never the frozen base, which is train.init_from's."""

    def __init__(self, name: str, module: nn.Module, sharded: bool, main: bool, keep: Keep = None):
        self.name, self.module, self.sharded, self.main, self.keep = name, module, sharded, main, keep

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return _kept(get_model_state_dict(self.module), self.keep)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # kept entries only in a LoRA run: the frozen base stays as train.init_from loaded it
        set_model_state_dict(self.module, state, options=_options(strict=self.keep is None))

    def full_state_dict(self) -> dict[str, Any] | None:
        """The whole tensors; sharded, every rank must call it (a gather) and ranks other than 0 get None."""
        if not self.sharded:
            return _kept(self.module.state_dict(), self.keep)
        if self.keep is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            state = get_model_state_dict(self.module, options=_options(full_state_dict=True, cpu_offload=True))
        else:  # the kept tensors alone, each gathered in turn on every rank, not the frozen base
            state = {}
            for key, value in self.module.state_dict().items():
                if self.keep(key):
                    full = value.full_tensor() if hasattr(value, "full_tensor") else value
                    state[key] = full.detach().cpu() if isinstance(full, torch.Tensor) else full
        return state if self.main else None

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        weights, extra = ckpt.split_extra_state(state)
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict

            set_model_state_dict(self.module, state, options=_options(full_state_dict=True, strict=self.keep is None))
        elif self.keep is not None:
            lora_training.load_adapter_state(self.module, weights, extra, f"train.resume ({self.name})")
        else:
            ckpt.load_module_state(self.module, weights, extra)

    def own_extra(self, saved: dict[str, Any]) -> dict[str, Any]:
        """te.Linear's `_extra_state` entries for this module when torch's state-dict API loads it: the saved ones
        where the checkpoint has them, the module's own (unchanged) where it has none (TE then starts its scaling
        afresh, as load_module_state does), none for a module without TE layers."""
        own = {k: v for k, v in self.module.state_dict().items() if ckpt.is_extra_state_key(k)}
        return {k: saved.get(k, v) for k, v in own.items()}


class OptimizerState:
    """`optimizer`: the optimizer over `model`'s parameters as wrapped (FSDP2 replaces them by sharded DTensors)."""

    def __init__(self, model: nn.Module, opt: Optimizer, sharded: bool, main: bool, keep: Keep = None):
        self.model, self.opt, self.sharded, self.main, self.keep = model, opt, sharded, main, keep

    def state_dict(self) -> dict[str, Any]:
        """Keyed by parameter name (allocates the moments of an optimizer that has not stepped yet)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.opt)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.opt, state, options=_options(strict=self.keep is None))

    def full_state_dict(self) -> dict[str, Any] | None:
        """Numbered by index, as torch.optim saves it; sharded, gathered like ModuleState.full_state_dict."""
        if not self.sharded:
            return self.opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self.opt, options=_options(full_state_dict=True, cpu_offload=True))
        return optimizer_by_index(state) if self.main else None

    def load_full_state_dict(self, state: dict[str, Any]) -> None:
        if not self.sharded:
            self.opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = {id(p): n for n, p in self.model.named_parameters()}
        order = [names[id(p)] for group in self.opt.param_groups for p in group["params"]]
        set_optimizer_state_dict(self.model, self.opt, optimizer_by_name(state, order),
                                 options=_options(full_state_dict=True, strict=self.keep is None))


class LoaderState:
    """`loader`: where this rank's data stands after the run's steps (steps x micro-batches x micro-batch samples).
    A checkpoint's position is read before the loader exists: `resume` holds it for build_loader, `dataset` is the
    loader's once built."""

    def __init__(self, run: "RunState", world_size: int, num_workers: int, micro: int, grad_accum: int):
        self.run, self.world_size, self.num_workers, self.micro, self.grad_accum = (run, world_size, num_workers,
                                                                                    micro, grad_accum)
        self.dataset = None
        self.resume: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_at(self.run.step * self.grad_accum * self.micro)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """On another world size the data continues from the same global sample count (continue_loader)."""
        self.resume = continue_loader(state, self.world_size, self.num_workers, self.micro)
        saved_world, world = int(state.get("world_size", self.world_size)), self.world_size
        if saved_world != world:
            samples = self.resume["samples"]
            log.warning("resumed on %d ranks from a checkpoint saved on %d: the data continues at global sample %d "
                        "(%d per rank), in another order than a %d-rank run would take", world, saved_world,
                        samples * world, samples, saved_world)


class RngState:
    """`rng`: the global RNG states of this rank (the loop's own draws come from per-step generators)."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict[str, Any]:
        return rng_states(self.device)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng_states(state, self.device)


@dataclass
class RunState:
    """`run`: where the run is. Its entries sit at a checkpoint's top level."""

    step: int = 0
    history: list[float] = field(default_factory=list)
    """The mean training loss of every step."""
    bad_in_row: int = 0
    """Consecutive steps with a non-finite loss or gradient norm (train.max_bad_steps stops the run)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Values the summary reports: held_loss_start, the last validation."""

    def state_dict(self) -> dict[str, Any]:
        return dict(step=self.step, history=self.history, bad_in_row=self.bad_in_row, extra=self.extra)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.history = state["step"], list(state["history"])
        self.bad_in_row, self.extra = state.get("bad_in_row", 0), dict(state.get("extra", {}))


class TrainingState:
    """The parts of a run (`parts`, keyed as the module docstring lists them) and a checkpoint of either form made of
    them; `describe()` gives what a checkpoint records beside them and never loads back (config, metadata). `main`:
    rank 0, which holds the whole form when the tensors are sharded."""

    POSITION = ("run", "loader")
    """What a resume reads first: the loader is built from it."""
    TENSORS = (*TENSOR_PARTS, "scheduler")
    """What a resume reads once the model is wrapped and sharded and the optimizer built over its final parameters."""
    RNG = ("rng",)
    """What a resume restores last, after everything that draws from the global RNGs on the way (iter(loader))."""

    def __init__(self, parts: dict[str, Any], describe: Callable[[], dict[str, Any]], main: bool):
        self.parts, self.describe, self.main = parts, describe, main

    def attach(self, model: nn.Module, ema: nn.Module, opt: Optimizer, scheduler, sharded: bool, keep: Keep) -> None:
        """The tensor parts and the schedule, once the model is wrapped and sharded and the optimizer built over its
        final parameters (the run, loader and RNG parts come first: a resume reads the position before)."""
        self.parts |= dict(model=ModuleState("model", model, sharded, self.main, keep),
                           ema=ModuleState("ema", ema, sharded, self.main, keep),
                           optimizer=OptimizerState(model, opt, sharded, self.main, keep), scheduler=scheduler)

    @property
    def sharded(self) -> bool:
        return self.parts["model"].sharded

    def file_state(self) -> dict[str, Any] | None:
        """The single-file form. Sharded, every rank must call it (the tensors are gathered into rank 0's CPU
        memory) and ranks other than 0 get None."""
        tensors = {name: self.parts[name].full_state_dict() for name in TENSOR_PARTS}
        if self.sharded and not self.main:
            return None
        (model, model_extra), (ema, ema_extra) = (ckpt.split_extra_state(tensors[k]) for k in ("model", "ema"))
        state = dict(model=model, ema=ema, optimizer=tensors["optimizer"],
                     scheduler=self.parts["scheduler"].state_dict(), **self.parts["run"].state_dict(),
                     **self.describe(), loader=self.parts["loader"].state_dict(), rng=self.parts["rng"].state_dict())
        if model_extra or ema_extra:
            state["te_extra_state"] = dict(model=model_extra, ema=ema_extra)
        return state

    def sharded_state(self, world_size: int, parallel: str) -> tuple[dict, dict, dict]:
        """The sharded form's three parts (trainer/checkpoint.py: ShardedWriter): the tensors DCP writes (each rank its
        shards), what rank 0 writes once (meta.pt), and this rank's own."""
        (model, model_extra), (ema, ema_extra) = (ckpt.split_extra_state(self.parts[k].state_dict())
                                                  for k in ("model", "ema"))
        optimizer = self.parts["optimizer"].state_dict()
        shared: dict[str, Any] = dict(optimizer_groups=optimizer["param_groups"])
        if model_extra or ema_extra:
            shared["te_extra_state"] = dict(model=model_extra, ema=ema_extra)
        shared |= self.parts["run"].state_dict() | self.describe() | dict(
            scheduler=self.parts["scheduler"].state_dict(), world_size=world_size, parallel=parallel)
        own = dict(loader=self.parts["loader"].state_dict(), rng=self.parts["rng"].state_dict())
        return dict(model=model, ema=ema, optimizer=optimizer["state"]), shared, own

    def load(self, state: dict[str, Any], names: tuple[str, ...]) -> None:
        """The parts `names` from a checkpoint of either form (a loaded file, or a sharded folder opened by
        core/checkpoint.py's `load`); every rank calls it. POSITION, TENSORS and RNG are the order a resume takes."""
        tensors = [name for name in names if name in TENSOR_PARTS]
        if tensors and isinstance(state["model"], ShardedEntry):
            self._load_sharded(state)
        elif tensors:
            self._load_file(state)
        for name in names:
            if name not in TENSOR_PARTS:
                self.parts[name].load_state_dict(state if name == "run" else state[name])

    def _load_file(self, state: dict[str, Any]) -> None:
        """Whole tensors into the modules as they are wrapped (whole on every rank, or sharded over a mesh)."""
        saved = state.get("te_extra_state") or {}
        weights, extra = {}, {}
        for key in ("model", "ema"):
            weights[key], inline = ckpt.split_extra_state(state[key])
            both = inline | saved.get(key, {})
            extra[key] = self.parts[key].own_extra(both) if self.sharded else both
        extra = loadable_extra_state(extra, "the checkpoint")
        for key in ("model", "ema"):
            self.parts[key].load_full_state_dict(weights[key] | extra[key])
        self.parts["optimizer"].load_full_state_dict(state["optimizer"])

    def _load_sharded(self, state: dict[str, Any]) -> None:
        """A sharded folder into this run's tensors (shards of any size, or whole ones) whatever the saved run's
        layout was: the parts' own state dicts are DCP's target, filled in place, then handed back to them."""
        path = state["model"].path
        target = {key: ckpt.split_extra_state(self.parts[key].state_dict())[0] for key in ("model", "ema")}
        optimizer = self.parts["optimizer"].state_dict()  # allocates the moments, then overwritten
        target["optimizer"] = optimizer["state"]
        load_sharded(path, target)
        saved = state.get("te_extra_state") or {}
        extra = loadable_extra_state({key: self.parts[key].own_extra(saved.get(key, {})) for key in ("model", "ema")},
                                     str(path))
        for key in ("model", "ema"):
            self.parts[key].load_state_dict(target[key] | extra[key])
        self.parts["optimizer"].load_state_dict(dict(state=target["optimizer"], param_groups=state["optimizer_groups"]))


def with_own_rng(state: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """A checkpoint to resume with this rank's own RNG states, where a sharded one saved on as many ranks keeps them
    (rank_RRRRR.pt); rank 0's otherwise (a file keeps rank 0's alone, and on another world size the ranks differ)."""
    model = state["model"]
    own = model.path / rank_file(rank) if isinstance(model, ShardedEntry) else None
    if own is not None and own.is_file() and int(state["loader"].get("world_size", world_size)) == world_size:
        return state | dict(rng=ckpt.load(own)["rng"])
    return state


def follow_config_schedule(opt: Optimizer, scheduler, o, max_steps: int) -> None:
    """After a resume: the saved param groups carry the old run's hyperparameters; this run's config (`o`: optim)
    rules: learning rate, warmup and decay, betas, eps, weight decay."""
    for group in opt.param_groups:
        group.update(betas=tuple(o.betas), eps=o.eps, initial_lr=o.lr)
        group["weight_decay"] = o.weight_decay if group["weight_decay"] else 0.0
    scheduler.base_lrs = [o.lr for _ in opt.param_groups]
    for group, base, factor in zip(opt.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(scheduler.last_epoch)  # what LambdaLR computes at this step
    scheduler._last_lr = [g["lr"] for g in opt.param_groups]
    log.info("kept from the checkpoint: weights, EMA, optimizer moments, history, data position, RNG; from this "
             "config: optim.lr=%g, warmup %d, decay_fraction %g, train.max_steps=%d", o.lr, o.warmup_steps,
             o.decay_fraction, max_steps)
