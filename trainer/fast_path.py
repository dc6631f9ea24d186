"""Speed applied from outside the model, torchtitan-style: activation checkpointing and torch.compile per block.

Both keep parameter names unchanged (no `_checkpoint_wrapped_module.` or `_orig_mod.` prefix), so the
optimizer's weight-decay groups, EMA, DDP's ignore list and checkpoints see the plain model:

- checkpointing replaces each block's `forward` by a bound method that runs the class's forward under
  torch.utils.checkpoint (a bound method deep-copies onto the copy, so an EMA copy made later stays right);
- `compile: block` calls nn.Module.compile() on each block, which compiles the module's call in place.

"Each block" is the model contract's `blocks` (models/base.py): a DiT's blocks, and for PixelDiT its semantic
blocks then its pixel blocks.
  With torch's default of treating module parameters as graph inputs (2.5+), blocks of the same shapes
  can share one compiled graph, so compile time tends towards one block's rather than the whole depth's.

With Transformer Engine layers (precision=fp8) two things change, both from TE's source (tests/te_standin.py
cites it):

- te.Linear reads TE's global FP8 state on every forward, and the backward runs after the FP8 autocast has closed,
  so a block recomputed by torch.utils.checkpoint would run its te.Linear layers on their high-precision path, save
  other tensors than the forward did, and torch would stop the backward with a CheckpointError. Blocks holding
  te.Linear layers are therefore checkpointed by TE's own `transformer_engine.pytorch.distributed.checkpoint`, which
  recomputes inside the FP8 autocast with the forward's recipe (and delayed-scaling layers with the forward's
  scales); blocks without them keep torch's.
- TE marks te.Linear's forward `no_torch_dynamo`, and its checkpoint function too: torch.compile cuts a block's graph
  at every te.Linear (compiling the norms, modulation, attention and activations between them), and cannot trace a
  block checkpointed by TE at all, which then runs eagerly. `fp8_compile_note` says which applies; the trainer logs
  it and the memory planner prints it.

Attention runs through F.scaled_dot_product_attention (models/attention.py). On CUDA in bf16 it takes
FlashAttention-2 for unmasked self-attention and cuDNN / memory-efficient attention for the masked
cross-attention (flash takes no arbitrary mask); the choice is torch's, nothing to configure here.
"""

import functools
import logging
import types
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.base import DiffusionTransformer
from models.linear import te_linears

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("none", "model", "block")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Non-reentrant: works with keyword arguments, with inputs that need no grad, and under torch.compile.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def _te_checkpointed_forward(self: nn.Module, *args, **kwargs):
    # TE's checkpoint recomputes inside the FP8 autocast the forward ran under (see the module docstring).
    from transformer_engine.pytorch.distributed import checkpoint as te_checkpoint

    return te_checkpoint(functools.partial(type(self).forward, self), *args, use_reentrant=False, **kwargs)


def checkpointed_by_te(block: nn.Module) -> bool:
    return getattr(block.forward, "__func__", None) is _te_checkpointed_forward


def blocks_of(model: nn.Module) -> Sequence[nn.Module]:
    """The blocks the model contract names; a TypeError for a module that does not follow it."""
    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"{type(model).__name__} is not a models.base.DiffusionTransformer, so it names no "
                        "`blocks` to apply train.activation_checkpointing or train.compile=block to")
    return model.blocks


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in the backward instead of storing them, through TE's checkpoint where
    the block holds te.Linear layers; returns how many blocks."""
    blocks = blocks_of(model)
    by_te = 0
    for block in blocks:
        te = bool(te_linears(block))
        block.forward = types.MethodType(_te_checkpointed_forward if te else _checkpointed_forward, block)
        by_te += te
    log.info("activation checkpointing on %d blocks%s", len(blocks),
             f" ({by_te} through Transformer Engine's checkpoint, which recomputes inside the FP8 autocast)"
             if by_te else "")
    return len(blocks)


def compile_choice(value) -> str:
    """train.compile: false/none, true/model (the whole forward) or block (each block)."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "model"
    if value in COMPILE_CHOICES:
        return value
    raise ValueError(f"train.compile={value!r}: expected false, true (whole model) or block")


def fp8_compile_note(how, checkpointing: bool) -> str | None:
    """What train.compile=`how` does to a model with te.Linear layers (None when it compiles nothing). Reasoned from
    TE's source, not measured: no FP8 run has been timed here."""
    how = compile_choice(how)
    if how == "none":
        return None
    if checkpointing:
        return (f"train.compile={how} with FP8 and activation checkpointing: Transformer Engine's checkpoint, which "
                "checkpointed blocks holding te.Linear layers run through, is not traced by torch.compile, so those "
                "blocks run eagerly and compiling only costs compile time; train.compile=false does the same work")
    return (f"train.compile={how} with FP8: torch.compile does not trace te.Linear (Transformer Engine marks its "
            "forward no_torch_dynamo), so each block's graph is cut at every te.Linear; what it compiles is the "
            "norms, modulation, attention and activations between them. Whether that beats eager FP8 or compiled "
            "bf16 is unmeasured: time it with scripts/bench/train.py")


def apply_compile(model: nn.Module, how) -> nn.Module:
    """The module to run forward through: `model` itself (none, block: compiled in place) or a compiled
    wrapper around it (model). Save `model`, never the wrapper."""
    how = compile_choice(how)
    if how != "none" and te_linears(model):
        checkpointing = any(checkpointed_by_te(b) for b in blocks_of(model)) if isinstance(
            model, DiffusionTransformer) else False
        log.warning(fp8_compile_note(how, checkpointing))
    if how == "model":
        return torch.compile(model)
    if how == "block":
        blocks = blocks_of(model)
        for block in blocks:
            block.compile()
        log.info("torch.compile per block (%d blocks)", len(blocks))
    return model
