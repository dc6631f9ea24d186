"""How the trained model is spread over the ranks: DDP (the default and the reference) or FSDP2 / HSDP, all
through torch.distributed; nothing here shards by hand.

    ddp   every rank holds the whole model, its gradients, both AdamW moments and the EMA (16 B per parameter
          plus DDP's 4 B of buckets); gradients are all-reduced once per optimizer step (no_sync before).
    fsdp  `fully_shard` on each block of the model contract (models/base.py `blocks`), then on the root, over a
          1-D mesh of every rank [zhao2023fsdp, rajbhandari2020zero]: parameters, gradients, optimizer moments
          and the EMA are sharded (dim 0), 16 B / N per parameter. A block's parameters are all-gathered for its
          forward, freed, all-gathered again for its backward, and its gradients reduce-scattered.
    hsdp  the same over a 2-D mesh (replicate x shard, trainer/distributed.py): sharded within a group of
          train.hsdp_shard_size ranks (a node), replicated across groups.

The order with the fast path (trainer/fast_path.py) is fixed, innermost first, and checked by the tests:

    activation checkpointing (each block's forward recomputes in the backward)
      -> torch.compile per block (in place; FSDP2's hooks stay outside the compiled region)
      -> fully_shard per block -> fully_shard of the root

so a block's all-gather and reduce-scatter wrap its checkpointed, compiled forward (torchtitan's order), and
parameter names never change: the optimizer's weight-decay groups, the EMA and checkpoints see plain names.
`train.compile=true` (one graph of the whole model) is not composed with sharding: use `block`.

Mixed precision on GPU (precision.compute=bf16): `MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`:
the all-gathered compute copy is bf16, gradients are reduced and accumulated in fp32 into the fp32 sharded
master weights the optimizer steps. Forward inputs are NOT cast to bf16 (cast_forward_inputs=False) and the
forward still runs under bf16 autocast, as under DDP: the times t and the sinusoidal embedding stay fp32 (in
bf16 t would keep 3 significant digits), and norms run in fp32 as autocast chooses. On a CPU everything is fp32.

Gradient accumulation. fsdp reduce-scatters every micro-batch, so gradients accumulate sharded in fp32 (skipping
the reduction would keep a whole unsharded gradient per rank, in bf16 on GPU); hsdp reduce-scatters every
micro-batch within its group and all-reduces across groups on the last one only. The global gradient norm is
computed over the sharded gradients (a DTensor reduced over the mesh), so every rank clips by the same number
and takes, or skips, the same step.

The EMA is sharded exactly like the model (trainer/ema.py blends each rank's local shard with the matching
shard of the weights: the same update, element for element). Previews and the held losses run on rank 0 from a
copy gathered for the occasion (`full_copy`), so trainer/preview.py and trainer/held_loss.py stay unchanged.
Frozen parameters (a LoRA run's base, trainer/lora.py) are sharded like the others, in the same groups: they get no
gradient, so FSDP2 reduce-scatters nothing of theirs and the optimizer holds no state for them, and FSDP2 asks one
dtype of the trainable parameters of a group only, so a base stored in bf16 shards beside fp32 adapters. DDP hooks
only parameters that require grad: a frozen base is broadcast once when wrapped and never all-reduced.
The frozen text encoder and the VAE are not sharded: they are called on rank 0 alone (previews, held batches)
or a different number of times per rank (the text cache), which a sharded module, whose forward is a
collective, cannot allow.
"""

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.ranks import Ranks
from trainer.config import check_value
from trainer.distributed import device_mesh
from trainer.errors import ConfigError
from trainer.fast_path import blocks_of, compile_choice

log = logging.getLogger(__name__)

def _dtensor_type():
    from torch.distributed.tensor import DTensor

    return DTensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a sharded parameter); any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, _dtensor_type()) else tensor


class Parallel:
    """train.parallel for one run: wraps the model for training, shards the EMA, and answers the loop's
    questions (is this micro-batch's gradient reduced, what is the global norm, where are the whole weights)."""

    def __init__(self, mode: str, env: Ranks, bf16: bool, shard_size: int | None = None):
        check_value("train.parallel", mode)
        self.mode, self.env, self.bf16 = mode, env, bf16
        self.mesh = device_mesh(env, mode, shard_size) if self.sharded else None

    @property
    def sharded(self) -> bool:
        return self.mode != "ddp"

    def check(self, compile_setting, fused_wgrad: bool) -> None:
        """What this mode cannot combine with, as a ConfigError naming the key."""
        if not self.sharded:
            return
        if compile_choice(compile_setting) == "model":
            raise ConfigError(f"train.compile=true with train.parallel={self.mode}: FSDP2 is composed with "
                              "per-block compile only; use train.compile=block")
        if fused_wgrad:
            raise ConfigError(
                f"precision.fuse_wgrad_accumulation=true with train.parallel={self.mode}: te.Linear would add its "
                "weight gradients to main_grad behind autograd's back, where FSDP2 cannot reduce-scatter them; set "
                "precision.fuse_wgrad_accumulation=false (or train.parallel=ddp)"
            )

    # ---- wrapping -------------------------------------------------------------------------------------------

    def wrap(self, model: nn.Module, main_grads=None) -> nn.Module:
        """The module to run forward through, after the fast path has been applied to `model`: DDP around it,
        or `model` itself sharded in place (per block, then the root)."""
        if self.sharded:
            self._shard(model, self._mixed_precision())
            log.info("train.parallel=%s: fully_shard on %d blocks and the root over mesh %s%s", self.mode,
                     len(blocks_of(model)), dict(zip(self.mesh.mesh_dim_names, self.mesh.shape, strict=True)),
                     ", bf16 compute / fp32 reduction" if self.bf16 else "")
            return model
        if not self.env.enabled:
            return model
        if main_grads:
            main_grads.exclude_from_ddp(model)
            main_grads.broadcast()
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def shard_ema(self, ema_model: nn.Module) -> None:
        """Shard the EMA copy as the model is sharded (same mesh, same blocks), so shard i of every EMA tensor
        sits on the rank that holds shard i of the weight. It is never run sharded (previews use full_copy), so
        it keeps fp32 and no mixed-precision policy."""
        if self.sharded:
            self._shard(ema_model, None)

    def _shard(self, model: nn.Module, mp_policy) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs = dict(mesh=self.mesh, mp_policy=mp_policy or MixedPrecisionPolicy())
        for block in blocks_of(model):
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)

    def _mixed_precision(self):
        if not self.bf16:
            return None
        from torch.distributed.fsdp import MixedPrecisionPolicy

        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                    cast_forward_inputs=False)

    # ---- the step -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def micro_batch(self, forward_model: nn.Module, last: bool) -> Iterator[None]:
        """The context of one micro-batch's forward and backward: DDP skips its all-reduce before the last
        (no_sync); hsdp skips the all-reduce across replicas before the last; fsdp reduce-scatters every one."""
        if self.mode == "ddp" and self.env.enabled and not last:
            with forward_model.no_sync():
                yield
            return
        if self.mode == "hsdp":
            forward_model.set_requires_all_reduce(last)
        try:
            yield
        finally:
            if self.mode == "hsdp":
                forward_model.set_requires_all_reduce(True)

    def clip(self, parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm; returns it as a plain 0-d tensor, the same on every rank."""
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        # Over sharded gradients the norm is a DTensor already reduced over the mesh (Replicate).
        return norm.full_tensor() if isinstance(norm, _dtensor_type()) else norm

    # ---- whole weights, for rank 0 --------------------------------------------------------------------------

    @contextlib.contextmanager
    def full_copy(self, module: nn.Module, model_config, adapt=None) -> Iterator[nn.Module | None]:
        """`module` with all its weights, for what runs on rank 0 alone (previews, held losses). Unsharded it is
        `module` itself on every rank. Sharded, every rank must enter (the weights are gathered); rank 0 gets a
        plain fp32 copy on its device, freed on exit, and the other ranks None. `adapt(model)`: what a fresh model
        needs to take `module`'s weights (a LoRA run's layers, trainer/lora.py)."""
        if not self.sharded:
            yield module
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from core.checkpoint import load_module_state, split_extra_state
        from models import build_model

        state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.env.is_main:
            yield None
            return
        with torch.device("meta"):
            copy = build_model(model_config)
            copy = adapt(copy) if adapt is not None else copy
        copy = copy.to_empty(device=self.env.device)
        load_module_state(copy, split_extra_state(state)[0])  # te.Linear's scaling state is not needed here
        del state
        copy.train(module.training).requires_grad_(False)
        try:
            yield copy
        finally:
            del copy
