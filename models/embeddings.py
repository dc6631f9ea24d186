"""Input embeddings shared by every model family: timesteps, class labels, patches and positions."""

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float, Int
from torch import Tensor, nn


def timestep_embedding(t: Float[Tensor, " b"], dim: int, max_period: float = 10_000.0) -> Float[Tensor, "b dim"]:
    """Sinusoidal embedding [cos | sin] of a continuous time, as in the Transformer/DiT [vaswani2017, peebles2023].

    Frequencies run from 1 down to 1/max_period radians per unit of `t`, so callers scale t in [0, 1]
    by a few hundred or thousand (`ModelConfig.time_scale`) to make neighbouring times distinguishable.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]  # b half
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoid of width `dim`. No parameters: each consumer owns the MLP it applies."""

    def __init__(self, dim: int, time_scale: float, max_period: float = 10_000.0):
        super().__init__()
        self.dim = dim
        self.time_scale = time_scale
        self.max_period = max_period

    def forward(self, t: Float[Tensor, " b"]) -> Float[Tensor, "b dim"]:
        return timestep_embedding(t * self.time_scale, self.dim, self.max_period)


def null_label_for(num_classes: int) -> int:
    """The null class used for classifier-free guidance: the label after the real ones, 0..num_classes-1."""
    return num_classes


def check_labels(labels: Sequence[Any], num_classes: int, what: str = "labels") -> list[int]:
    """`labels` as ints, each a real class or the null class (0..num_classes); a ValueError naming `what`
    and the valid range otherwise (a bool or a float is no label). The one range check for labels a person
    gives (previews, the CLI, the app); the model's forward does not check, which would cost a device sync."""
    null = null_label_for(num_classes)
    bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, Integral) or not 0 <= c <= null]
    if bad:
        raise ValueError(f"{what} {bad} out of range 0..{null} ({num_classes} classes 0..{num_classes - 1}; "
                         f"{null} is the null class)")
    return [int(c) for c in labels]


class LabelEmbedder(nn.Module):
    """Class label -> vector. Row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return null_label_for(self.num_classes)

    def forward(self, labels: Int[Tensor, " b"]) -> Float[Tensor, "b dim"]:
        return self.table(labels)


def grid_positions(
    grid_h: int, grid_w: int, base_grid: int, device: torch.device | None = None
) -> tuple[Float[Tensor, " grid_h"], Float[Tensor, " grid_w"]]:
    """Row and column positions (float64) of a grid_h x grid_w token grid in units of the base grid, per axis.

    Rows step by base_grid / grid_h and columns by base_grid / grid_w, so each axis spans [0, base_grid) whatever
    its length: a model trained at the base resolution sees the same range of positions at any other size or
    aspect ratio and interpolates between them, as PixArt-alpha's multi-aspect stages do [chen2023pixartalpha].
    A square grid gets the step base_grid / side it always had. The sin-cos table and RoPE (models/rope.py) both
    measure positions this way.
    """
    ys = torch.arange(grid_h, device=device, dtype=torch.float64) * (base_grid / grid_h)
    xs = torch.arange(grid_w, device=device, dtype=torch.float64) * (base_grid / grid_w)
    return ys, xs


def sincos_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int, base_grid: int, device: torch.device | None = None
) -> Float[Tensor, "n dim"]:
    """2-D sin-cos position embedding for a grid_h x grid_w token grid, rows first (n = grid_h * grid_w), at
    positions in base-grid units per axis (`grid_positions`). Half the channels encode the row (y), half the column
    (x), each as [sin | cos].
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    ys, xs = grid_positions(grid_h, grid_w, base_grid, device)
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, device=device, dtype=torch.float64) / quarter)

    def encode(pos: Tensor) -> Tensor:  # [g] -> [g, dim/2]
        angles = pos[:, None] * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    emb_y = encode(ys)[:, None, :].expand(grid_h, grid_w, dim // 2)
    emb_x = encode(xs)[None, :, :].expand(grid_h, grid_w, dim // 2)
    emb = torch.cat([emb_y, emb_x], dim=-1)  # h w dim
    return rearrange(emb, "h w d -> (h w) d").float()


def resize_positions(table: Float[Tensor, "n d"], base_grid: int, grid_h: int, grid_w: int) -> Float[Tensor, "m d"]:
    """A learned base_grid x base_grid position table resized to grid_h x grid_w by bicubic interpolation
    (as ViTs do when fine-tuned at another resolution [dosovitskiy2021vit]); the table itself as it is at its
    own grid."""
    if (grid_h, grid_w) == (base_grid, base_grid):
        return table
    grid = rearrange(table, "(h w) d -> 1 d h w", h=base_grid)
    resized = F.interpolate(grid.float(), size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return rearrange(resized, "1 d h w -> (h w) d").to(table.dtype)


class PatchEmbed(nn.Module):
    """Image [b, c, H, W] -> tokens [b, n, dim] by a conv with kernel = stride = patch, plus positions:
    the fixed sin-cos table, or (`learned_positions`) a learnable table that starts from it and is resized
    for grids other than the base grid."""

    def __init__(self, in_channels: int, dim: int, patch: int, base_grid: int, learned_positions: bool = False):
        super().__init__()
        self.patch = patch
        self.base_grid = base_grid
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        table = sincos_pos_embed_2d(dim, base_grid, base_grid, base_grid)
        self.positions = nn.Parameter(table) if learned_positions else None

    def position_table(self, grid_h: int, grid_w: int, device) -> Float[Tensor, "n dim"]:
        if self.positions is None:
            return sincos_pos_embed_2d(self.proj.out_channels, grid_h, grid_w, self.base_grid, device)
        return resize_positions(self.positions, self.base_grid, grid_h, grid_w)

    def forward(self, x: Float[Tensor, "b c H W"]) -> Float[Tensor, "b n dim"]:
        H, W = x.shape[-2:]
        if H % self.patch or W % self.patch:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {self.patch}")
        # Contiguous tokens: the conv's output permuted to b n d is the same numbers in a transposed layout, which
        # every residual add downstream would keep, and inductor (torch 2.13, CPU) compiles a wrong backward for
        # a ccDiT block fed that layout (tests/test_fast_path.py compares per-block compile with eager).
        tokens = rearrange(self.proj(x), "b d h w -> b (h w) d").contiguous()
        pos = self.position_table(H // self.patch, W // self.patch, x.device)
        return tokens + pos.to(tokens.dtype)


def token_grid(size: Sequence[int], patch: int) -> tuple[int, int]:
    """(rows, columns) of the patch tokens over an input whose last two sizes are `size`: x.shape or (H, W)."""
    return size[-2] // patch, size[-1] // patch


def unpatchify(
    tokens: Float[Tensor, "b n pc"], patch: int, channels: int, grid_h: int, grid_w: int
) -> Float[Tensor, "b c H W"]:
    """Inverse of patchifying: token i holds the patch*patch*channels values of its patch, (p q c) order."""
    return rearrange(
        tokens, "b (h w) (p q c) -> b c (h p) (w q)", h=grid_h, w=grid_w, p=patch, q=patch, c=channels
    )


def patchify(x: Float[Tensor, "b c H W"], patch: int) -> Float[Tensor, "b n pc"]:
    """Reference patchify in the layout `unpatchify` inverts (the model itself patchifies with a conv)."""
    return rearrange(x, "b c (h p) (w q) -> b (h w) (p q c)", p=patch, q=patch)
