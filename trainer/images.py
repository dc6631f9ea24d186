"""Turning model outputs into images people look at: grids as PNG, loss curves as plots."""

import math
from pathlib import Path

import torch
from einops import rearrange
from jaxtyping import Float, UInt8
from PIL import Image
from torch import Tensor


def to_uint8(x: Float[Tensor, "b c h w"]) -> Tensor:
    """[-1, 1] pixels -> uint8 [b, h, w, c]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(images: Float[Tensor, "b c h w"], path: Path, cols: int, scale: int = 1) -> None:
    """Write a rows x cols grid (images in row-major order, padded with grey) as a PNG."""
    b = images.shape[0]
    rows = -(-b // cols)
    pad = rows * cols - b
    if pad:
        images = torch.cat([images, torch.zeros(pad, *images.shape[1:])])
    grid = rearrange(to_uint8(images), "(r k) h w c -> (r h) (k w) c", r=rows, k=cols)
    img = Image.fromarray(grid.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def save_uint8_grid(images: UInt8[Tensor, "b h w 3"], path: Path, cols: int, scale: int = 1) -> None:
    """save_grid for uint8 [b, h, w, 3] images (what app/pipeline.py returns)."""
    save_grid(images.permute(0, 3, 1, 2).float() / 127.5 - 1, path, cols=cols, scale=scale)


def save_loss_plot(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]  # skipped NaN steps
    steps, losses = [s for s, _ in kept], [v for _, v in kept]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(losses) // 30)
    if len(losses) > window:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="flow-matching MSE", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
