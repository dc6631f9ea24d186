"""Rectified-flow objective and sampler (t = 0 noise, t = 1 data).

    objective.py       the path, velocity and x-prediction, the loss and its weighting, timestep samplers, and the
                       resolution shift's map and factor (applied in rectified_flow.py)
    rectified_flow.py  RectifiedFlow: the training objective end to end (draws, shift, path, loss)
    sampler.py         the one ODE sampler (alpha-warped grid, torchdiffeq, classifier-free guidance)
    methods.py         the solver names (no torch: command-line parsers import it)

The names below are loaded on first use (PEP 562), so `import flow.methods` does not import torch.
"""

import importlib

_EXPORTS = {
    "flow.objective": (
        "LOSS_WEIGHTINGS", "PREDICTIONS", "SAMPLERS", "CosMap", "LogitNormal", "Mode", "Prediction", "TimestepSampler",
        "Uniform", "build_timestep_sampler", "flow_matching_loss", "interpolate", "loss_weight", "model_velocity",
        "resolution_shift", "shift_time", "velocity_target", "velocity_to_x", "x_to_velocity",
    ),
    "flow.sampler": ("alpha_warp", "guided_velocity", "sample", "time_grid"),
    "flow.methods": ("ADAPTIVE_METHODS", "FIXED_METHODS", "METHODS"),
    "flow.rectified_flow": ("RectifiedFlow",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'flow' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
