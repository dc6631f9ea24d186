"""AdamW with decoupled weight decay on matrices only, and a warmup-then-constant (optional linear
decay) learning-rate schedule."""

import math

import torch
from torch import nn

# Decay shrinks weights towards zero; for gains, biases, embeddings and learned tokens that only
# distorts what they encode (the reference excluded norms, biases and embeddings).
_NO_DECAY_NAMES = ("embed", "embedding", "null_text", "registers", "norm")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(part in name for part in _NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def build_optimizer(
    model: nn.Module, lr: float, weight_decay: float, betas, eps: float, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over `param_groups`; `fused` uses the single-kernel CUDA implementation."""
    return torch.optim.AdamW(
        param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps, fused=fused or None
    )


def lr_factor(step: int, warmup_steps: int, max_steps: int, decay_fraction: float) -> float:
    """Linear warmup to 1, constant, then (if decay_fraction > 0) linear decay to 0 over that last
    fraction of the run."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_start = math.floor(max_steps * (1 - decay_fraction))
    if decay_fraction > 0 and step >= decay_start:
        return max(0.0, (max_steps - step) / max(1, max_steps - decay_start))
    return 1.0
