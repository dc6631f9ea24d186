"""Named model sizes, `model_config` (a ModelConfig from its fields, or from a name such as 'mmDiT-XL/2'), and
`build_model`."""

import re
from typing import Any

from models.base import DiffusionTransformer
from models.ccdit import CCDiT
from models.config import PIXART_TIME_CHANNELS, ModelConfig
from models.joint_dit import JointDiT
from models.mmdit import MMDiT
from models.pixart import PixArt
from models.pixeldit import PixelDiT

FAMILIES: dict[str, type[DiffusionTransformer]] = {
    "ccdit": CCDiT, "mmdit": MMDiT, "jointdit": JointDiT, "pixeldit": PixelDiT, "mmpixeldit": PixelDiT,
    "pixart": PixArt,
}

# Widths, depths and heads of DiT's S/B/L/XL [peebles2023]. Defaults describe 256 px SD3-VAE latents
# (16 x 32 x 32), ImageNet-1k labels and a 2048-wide encoder (T5Gemma-XL in the reference).
SIZES: dict[str, dict[str, Any]] = {
    "S": dict(dim=384, depth=12, heads=6),
    "B": dict(dim=768, depth=12, heads=12),
    "L": dict(dim=1024, depth=24, heads=16),
    "XL": dict(dim=1152, depth=28, heads=16),
    # Depth 2 on 32 px RGB with MiniLM's 384-wide tokens: the embedded default, seconds on a CPU.
    "debug": dict(
        dim=64, depth=2, heads=4, cond_dim=64, in_channels=3, num_classes=8, text_dim=384, text_len=16
    ),
}
# Latent models patch a 32x32 latent by 2 or 4; pixel models a 256x256 image by 8 or 16 (PixelDiT's 16).
PATCHES = {"ccdit": (2, 4), "mmdit": (2, 4), "jointdit": (2, 4), "pixeldit": (8, 16), "mmpixeldit": (8, 16),
           "pixart": (2, 4)}
# Pixel models: learnable absolute positions plus 2-D RoPE, as the PixelDiT / JiT line of work uses.
_PIXEL = dict(pos_embed="learned", rope=True, in_channels=3, input_size=256)
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "jointdit": dict(num_registers=4),
    "pixeldit": _PIXEL,
    "mmpixeldit": _PIXEL | dict(num_registers=4),
    "pixart": dict(qk_norm=False, activation="gelu_tanh"),  # PixArt-alpha's own MLP
}
FAMILY_PINNED: dict[str, dict[str, Any]] = {"pixart": dict(cond_dim=PIXART_TIME_CHANNELS)}
"""Fields a family fixes whatever the size says (overrides may still try, and ModelConfig refuses them):
diffusers' PixArt timestep MLP reads a 256-wide sinusoid at every size."""

_NAME = re.compile(r"^(?P<family>[a-z]+)-(?P<size>[a-z]+)/(?P<patch>\d+)$", re.IGNORECASE)


def model_config(name: str | None = None, /, **fields: Any) -> ModelConfig:
    """A ModelConfig from its fields: `family`, `size` and `patch` pick the family's defaults and the named size
    (family and size case-insensitive), and every other field of ModelConfig given overrides them:
    model_config(family="mmdit", size="XL", patch=2, in_channels=3). People and command lines may name the first
    three instead, as 'mmDiT-XL/2' (family-size/patch): model_config("mmDiT-XL/2", in_channels=3)."""
    where = ""
    if name is not None:
        match = _NAME.match(name.strip())
        if match is None:
            raise ValueError(f"model name {name!r} is not of the form FAMILY-SIZE/PATCH, e.g. 'mmDiT-XL/2'")
        fields, where = dict(family=match["family"], size=match["size"], patch=match["patch"]) | fields, f" in {name!r}"
    if not {"family", "size", "patch"} <= set(fields):
        raise TypeError("model_config needs family, size and patch (or a name such as 'mmDiT-XL/2')")
    given = dict(family=fields.pop("family"), size=fields.pop("size"), patch=fields.pop("patch"))
    family = str(given["family"]).lower()
    size = {s.lower(): s for s in SIZES}.get(str(given["size"]).lower())
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {given['family']!r}{where}; known: {sorted(FAMILIES)}")
    if size is None:
        raise ValueError(f"unknown model size {given['size']!r}{where}; known: {list(SIZES)}")
    named = dict(family=family, size=size, patch=int(given["patch"]))
    return ModelConfig(**named | FAMILY_DEFAULTS.get(family, {}) | SIZES[size] | FAMILY_PINNED.get(family, {}) | fields)


def build_model(config: ModelConfig | str, **overrides: Any) -> DiffusionTransformer:
    """Build an initialised model; `config` is a ModelConfig or a name for `model_config`."""
    if isinstance(config, str):
        config = model_config(config, **overrides)
    elif overrides:
        raise TypeError("pass overrides together with a model name, not with a ModelConfig")
    return FAMILIES[config.family](config)


def named_models() -> list[str]:
    """Every named model: each family at every size and patch (debug at patch 4 only)."""
    names = []
    for family in FAMILIES:
        for size in SIZES:
            for patch in (4,) if size == "debug" else PATCHES[family]:
                names.append(model_config(family=family, size=size, patch=patch).name)
    return names
