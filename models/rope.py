"""2-D rotary position embedding (RoPE) for image tokens [su2021rope], axial form as in FLUX / SD3.5.

A query or key at grid position (y, x) has its head channels split in two halves: the first half is rotated
by angles y * omega, the second by x * omega, pairing channels (2i, 2i+1). A rotation R(p) satisfies
R(p)^T R(p') = R(p' - p), so q . k after rotation depends only on the offset between the two tokens.

Positions are measured in units of the base grid, per axis, as the sin-cos table is (models/embeddings.py:
grid_positions): an axis with s times as many tokens as the base grid steps by 1/s, so a model trained at one
resolution sees the same range of angles at another size or aspect ratio.
"""

import torch
from jaxtyping import Float
from torch import Tensor

from models.embeddings import grid_positions, token_grid


def rope_angles_2d(
    head_dim: int, grid_h: int, grid_w: int, base_grid: int, theta: float = 10_000.0, device=None
) -> Float[Tensor, "n half"]:
    """Rotation angles for every token of a grid_h x grid_w grid (rows first) and every channel pair:
    [n, head_dim / 2], the first head_dim / 4 columns from the row, the rest from the column."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got {head_dim} (model.dim / model.heads)")
    quarter = head_dim // 4
    omega = theta ** (-torch.arange(quarter, device=device, dtype=torch.float64) / quarter)
    ys, xs = grid_positions(grid_h, grid_w, base_grid, device)
    ang_y = (ys[:, None] * omega[None])[:, None, :].expand(grid_h, grid_w, quarter)
    ang_x = (xs[:, None] * omega[None])[None, :, :].expand(grid_h, grid_w, quarter)
    return torch.cat([ang_y, ang_x], dim=-1).reshape(grid_h * grid_w, 2 * quarter).float()


def apply_rope(x: Float[Tensor, "b h m e"], angles: Float[Tensor, "n half"]) -> Float[Tensor, "b h m e"]:
    """Rotate channel pairs (2i, 2i+1) of the last `n` of the m tokens of `x` by `angles`; earlier tokens (text or
    register tokens in a joint sequence) are left as they are. Computed in float32, returned in x's dtype."""
    n = angles.shape[0]
    head, tail = x[..., : x.shape[-2] - n, :], x[..., x.shape[-2] - n :, :]
    pairs = tail.float().unflatten(-1, (-1, 2))  # b h n half 2
    cos, sin = angles.cos(), angles.sin()
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
    return torch.cat([head, rotated.to(x.dtype)], dim=-2)


def grid_rope(cfg, x: Float[Tensor, "b c H W"]) -> Float[Tensor, "n half"] | None:
    """The RoPE angles a model with ModelConfig `cfg` uses on the patch grid of its input `x`, or None when
    `cfg.rope` is off (positions then come from the patch embedding's table alone)."""
    if not cfg.rope:
        return None
    grid_h, grid_w = token_grid(x.shape, cfg.patch)
    return rope_angles_2d(cfg.dim // cfg.heads, grid_h, grid_w, cfg.base_grid, cfg.rope_theta, x.device)
