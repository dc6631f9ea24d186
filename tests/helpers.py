"""Small utilities shared by the tests."""

import torch
from torch import nn


@torch.no_grad()
def randomize_zero_inits(model: nn.Module, std: float = 0.1, seed: int = 0) -> None:
    """Give every parameter random values so zero-initialised paths (gates, outputs) carry signal."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * std)


def text_inputs(cfg, batch: int, valid: list[int], seed: int = 0):
    """Random encoder states and a mask with `valid[i]` leading real tokens in row i."""
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen)
    mask = torch.arange(cfg.text_len)[None, :] < torch.tensor(valid)[:, None]
    return text, mask
