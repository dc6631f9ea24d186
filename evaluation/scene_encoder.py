"""A small image encoder of the synthetic scenes, trained by this repo on the renderer's own images, so the embedded
default has a distribution metric (a Frechet distance, as FID is on Inception features) that needs no download.

It is a feature net in evaluation/features.py's sense: uint8 images [b, 3, h, w] of any size -> {"pool": [b, 128]},
the global average of its last convolution. It learnt those features by telling apart what the captions name
(data/embedded/synthetic.py): the first shape's shape, colour and position, the background, and one shape or two.
The committed weights (evaluation/scene_encoder.safetensors, about 1 MB) come from

    python -m scripts.tools.train_scene_encoder        # a few CPU minutes; writes the file and prints its accuracies

whose settings, seed and held-out accuracies the file's safetensors metadata records. Images are resized to 32 px
first (the renderer's shapes are the same at 32, 40 and 48 px), so one encoder serves every embedded stage.
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from jaxtyping import Float, UInt8
from torch import Tensor, nn

from data.embedded.synthetic import BACKGROUNDS, COLOURS, POSITIONS, SHAPES

WEIGHTS = Path(__file__).with_name("scene_encoder.safetensors")
SIDE = 32
WIDTHS = (32, 64, 128, 128)
"""Channels of the 3x3 convolutions: the first three halve the side (32 -> 16 -> 8 -> 4 px), the last keeps it."""
HEADS: dict[str, int] = dict(shape=len(SHAPES), colour=len(COLOURS), position=len(POSITIONS),
                             background=len(BACKGROUNDS), shapes=2)
"""What the encoder was trained to read (each a softmax head on the pooled features)."""


class SceneEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for i, width in enumerate(WIDTHS):
            layers += [nn.Conv2d(channels, width, 3, stride=2 if i < 3 else 1, padding=1), nn.GroupNorm(8, width),
                       nn.SiLU()]
            channels = width
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({name: nn.Linear(channels, n) for name, n in HEADS.items()})

    def pooled(self, images: UInt8[Tensor, "b 3 h w"]) -> Float[Tensor, "b d"]:
        x = images.float() / 127.5 - 1.0
        if x.shape[-2:] != (SIDE, SIDE):
            x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
        return self.trunk(x).mean(dim=(2, 3))

    def logits(self, images: UInt8[Tensor, "b 3 h w"]) -> dict[str, Float[Tensor, "b k"]]:
        pool = self.pooled(images)
        return {name: head(pool) for name, head in self.heads.items()}

    @torch.no_grad()
    def forward(self, images: UInt8[Tensor, "b 3 h w"]) -> dict[str, Float[Tensor, "b d"]]:
        return dict(pool=self.pooled(images))


def load_scene_encoder(path: Path | str = WEIGHTS, device: str | torch.device = "cpu") -> SceneEncoder:
    """The committed encoder (or another file of the same layout), in eval mode."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no scene encoder weights (python -m scripts.tools.train_scene_encoder makes "
                                "them)")
    model = SceneEncoder()
    model.load_state_dict(load_file(path))
    return model.to(device).eval().requires_grad_(False)


def encoder_info(path: Path | str = WEIGHTS) -> dict:
    """What the weights file records about its training (safetensors metadata)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}
