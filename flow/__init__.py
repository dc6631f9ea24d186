"""Rectified-flow objective and sampler (t = 0 noise, t = 1 data)."""

from flow.objective import (
    PREDICTIONS,
    LogitNormal,
    Prediction,
    ResolutionShift,
    TimestepSampler,
    Uniform,
    build_timestep_sampler,
    flow_matching_loss,
    interpolate,
    model_velocity,
    resolution_shift,
    shift_time,
    velocity_target,
    velocity_to_x,
    x_to_velocity,
)
from flow.sampler import ADAPTIVE_METHODS, FIXED_METHODS, alpha_warp, guided_velocity, sample, time_grid

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_METHODS",
    "PREDICTIONS",
    "LogitNormal",
    "Prediction",
    "ResolutionShift",
    "TimestepSampler",
    "Uniform",
    "alpha_warp",
    "build_timestep_sampler",
    "flow_matching_loss",
    "guided_velocity",
    "interpolate",
    "model_velocity",
    "resolution_shift",
    "sample",
    "shift_time",
    "time_grid",
    "velocity_target",
    "velocity_to_x",
    "x_to_velocity",
]
