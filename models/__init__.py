"""Networks: ccDiT (class-conditional), mmDiT (PixArt-style cross-attention), JointDiT (SD3-style), PixelDiT and
MM-PixelDiT (pixel space), PixArt (diffusers' PixArt-alpha transformer); every one a
models.base.DiffusionTransformer."""

from models.base import DiffusionTransformer
from models.ccdit import CCDiT
from models.config import ModelConfig
from models.joint_dit import JointDiT
from models.linear import convert_linears, linear_backend, make_linear
from models.mmdit import MMDiT
from models.pixart import PixArt
from models.pixeldit import PixelDiT
from models.registry import FAMILIES, SIZES, build_model, model_config, named_models

__all__ = [
    "CCDiT",
    "DiffusionTransformer",
    "FAMILIES",
    "JointDiT",
    "MMDiT",
    "ModelConfig",
    "PixArt",
    "PixelDiT",
    "SIZES",
    "build_model",
    "convert_linears",
    "linear_backend",
    "make_linear",
    "model_config",
    "named_models",
]
