"""Coloured discs: a class-conditional toy dataset rendered in-process, deterministic from (seed, step).

Class k is the k-th named colour; position and radius vary. A model that learns the class-to-colour
map shows it at a glance in a preview grid, and 32 px RGB trains in minutes on a CPU.
"""

from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from data.embedded.synthetic import BACKGROUNDS, COLOURS  # one palette for every dataset

BACKGROUND = BACKGROUNDS["gray"]


@dataclass
class ColouredDiscs:
    """`batch(step)` returns the same images for the same (seed, step), so a resumed run sees the
    samples the uninterrupted one would have. Pixels are in [-1, 1]."""

    image_size: int = 32
    batch_size: int = 32
    seed: int = 0

    @property
    def num_classes(self) -> int:
        return len(COLOURS)

    @property
    def class_names(self) -> list[str]:
        return list(COLOURS)

    def batch(self, step: int) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=gen)
        return dict(image=render_discs(labels, self.image_size, gen), label=labels)


def render_discs(
    labels: Int[Tensor, "b"], size: int, generator: torch.Generator
) -> Float[Tensor, "b 3 size size"]:
    b = labels.shape[0]
    centre = (0.25 + 0.5 * torch.rand(b, 2, generator=generator)) * size  # b 2 (y, x)
    radius = (0.15 + 0.1 * torch.rand(b, generator=generator)) * size
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dy = coords[None, :, None] - centre[:, 0, None, None]
    dx = coords[None, None, :] - centre[:, 1, None, None]
    # One pixel of linear fall-off at the rim: anti-aliased, so the edge is not a staircase.
    coverage = (radius[:, None, None] - torch.sqrt(dy**2 + dx**2) + 0.5).clamp(0, 1)[:, None]  # b 1 H W
    palette = torch.tensor(list(COLOURS.values()), dtype=torch.float32)[labels][:, :, None, None] / 255
    background = torch.tensor(BACKGROUND, dtype=torch.float32)[None, :, None, None] / 255
    image = coverage * palette + (1 - coverage) * background
    return image * 2 - 1
