"""Networks: ccDiT (class-conditional), mmDiT (PixArt-style cross-attention), JointDiT (SD3-style), PixelDiT and
MM-PixelDiT (pixel space), PixArt (diffusers' PixArt-alpha transformer); every one a
models.base.DiffusionTransformer."""

import importlib

# Imported on first use (PEP 562), so `python -m models --help` answers without importing torch.
_WHERE = {
    "DiffusionTransformer": "models.base", "CCDiT": "models.ccdit", "ModelConfig": "models.config",
    "JointDiT": "models.joint_dit", "convert_linears": "models.linear", "linear_backend": "models.linear",
    "make_linear": "models.linear", "MMDiT": "models.mmdit", "PixArt": "models.pixart", "PixelDiT": "models.pixeldit",
    "FAMILIES": "models.registry", "SIZES": "models.registry", "build_model": "models.registry",
    "model_config": "models.registry", "named_models": "models.registry",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


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
