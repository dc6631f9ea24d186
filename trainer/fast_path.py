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

Attention runs through F.scaled_dot_product_attention (models/attention.py). On CUDA in bf16 it takes
FlashAttention-2 for unmasked self-attention and cuDNN / memory-efficient attention for the masked
cross-attention (flash takes no arbitrary mask); the choice is torch's, nothing to configure here.
"""

import logging
import types
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.base import DiffusionTransformer

log = logging.getLogger(__name__)

COMPILE_CHOICES = ("none", "model", "block")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Non-reentrant: works with keyword arguments, with inputs that need no grad, and under torch.compile.
    return checkpoint(type(self).forward, self, *args, use_reentrant=False, **kwargs)


def blocks_of(model: nn.Module) -> Sequence[nn.Module]:
    """The blocks the model contract names; a TypeError for a module that does not follow it."""
    if not isinstance(model, DiffusionTransformer):
        raise TypeError(f"{type(model).__name__} is not a models.base.DiffusionTransformer, so it names no "
                        "`blocks` to apply train.activation_checkpointing or train.compile=block to")
    return model.blocks


def checkpoint_blocks(model: nn.Module) -> int:
    """Recompute each block's activations in the backward instead of storing them; returns how many."""
    blocks = blocks_of(model)
    for block in blocks:
        block.forward = types.MethodType(_checkpointed_forward, block)
    log.info("activation checkpointing on %d blocks", len(blocks))
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


def apply_compile(model: nn.Module, how) -> nn.Module:
    """The module to run forward through: `model` itself (none, block: compiled in place) or a compiled
    wrapper around it (model). Save `model`, never the wrapper."""
    how = compile_choice(how)
    if how == "model":
        return torch.compile(model)
    if how == "block":
        blocks = blocks_of(model)
        for block in blocks:
            block.compile()
        log.info("torch.compile per block (%d blocks)", len(blocks))
    return model
