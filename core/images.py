"""Images people look at. One pixel convention throughout the repo:

    float pixels: [b, 3, h, w] in [0, 1]   what every autoencoder's decode returns (core/vae.py) and encode takes
    uint8 images: [b, h, w, 3] in 0..255   what samplers hand out (app/pipeline.py) and PNGs hold

Latents (pixel space included, where they are the pixels mapped to [-1, 1]) are the VAE's business, never
converted here.
"""

from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from jaxtyping import Float, UInt8
from PIL import Image
from torch import Tensor

GREY = 128
"""What pads a grid's empty cells."""


def to_uint8(pixels: Float[Tensor, "b 3 h w"]) -> UInt8[Tensor, "b h w 3"]:
    """[0, 1] float pixels -> uint8 images (rounded, clamped)."""
    return (pixels.float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def images_to_tensor(images: list[Image.Image]) -> Float[Tensor, "b 3 h w"]:
    """Same-size RGB PIL images -> [0, 1] float pixels."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # b h w 3
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


def grid(images: UInt8[Tensor, "b h w 3"], cols: int) -> UInt8[Tensor, "H W 3"]:
    """A rows x cols grid of images in row-major order, padded with grey."""
    b = images.shape[0]
    rows = -(-b // cols)
    pad = rows * cols - b
    if pad:
        images = torch.cat([images, torch.full((pad, *images.shape[1:]), GREY, dtype=torch.uint8)])
    return rearrange(images, "(r k) h w c -> (r h) (k w) c", r=rows, k=cols)


def save_grid(images: UInt8[Tensor, "b h w 3"], path: Path, cols: int, scale: int = 1) -> Path:
    """Write a grid of uint8 images as a PNG, upscaled `scale` times with nearest neighbour (tiny images stay
    crisp pixels)."""
    img = Image.fromarray(grid(images, cols).numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
