"""Rectified-flow objective.

Convention used everywhere in this repo: t in [0, 1], t = 0 is pure NOISE (x0 ~ N(0, I)) and t = 1 is
DATA (x1). The path is the straight line x_t = t * x1 + (1 - t) * x0, so its velocity is the constant
v = x1 - x0. Note that SD3 and diffusers count the other way (sigma = noise level = 1 - t); the
resolution shift below is written on sigma and translated.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

Prediction = Literal["velocity", "x"]
PREDICTIONS: tuple[str, ...] = ("velocity", "x")


def _bcast(t: Float[Tensor, "b"], like: Tensor) -> Tensor:
    """Reshape per-sample times [b] to [b, 1, 1, ...] so they broadcast over `like`."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(
    x0: Float[Tensor, "b ..."], x1: Float[Tensor, "b ..."], t: Float[Tensor, "b"]
) -> Float[Tensor, "b ..."]:
    """Point on the straight noise->data path: x_t = t * x1 + (1 - t) * x0."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0


def velocity_target(x0: Float[Tensor, "b ..."], x1: Float[Tensor, "b ..."]) -> Float[Tensor, "b ..."]:
    """d x_t / dt along the straight path; constant in t."""
    return x1 - x0


def x_to_velocity(
    x1_hat: Float[Tensor, "b ..."], x_t: Float[Tensor, "b ..."], t: Float[Tensor, "b"], eps: float = 0.05
) -> Float[Tensor, "b ..."]:
    """Velocity implied by a clean-data prediction (JiT x-prediction): (x1_hat - x_t) / (1 - t).

    1 - t is clamped at `eps` because the division blows up as t -> 1 (the data end), where the
    remaining distance to travel vanishes and any error in x1_hat would be amplified without bound.
    """
    return (x1_hat - x_t) / (1 - _bcast(t, x_t)).clamp(min=eps)


def velocity_to_x(
    v: Float[Tensor, "b ..."], x_t: Float[Tensor, "b ..."], t: Float[Tensor, "b"]
) -> Float[Tensor, "b ..."]:
    """Clean-data estimate from a velocity: follow v for the remaining time 1 - t."""
    return x_t + (1 - _bcast(t, x_t)) * v


def model_velocity(
    raw_output: Float[Tensor, "b ..."],
    x_t: Float[Tensor, "b ..."],
    t: Float[Tensor, "b"],
    prediction: Prediction = "velocity",
    eps: float = 0.05,
) -> Float[Tensor, "b ..."]:
    """Turn the network's raw output into a velocity; shared by training and sampling so they agree."""
    if prediction == "velocity":
        return raw_output
    if prediction == "x":
        return x_to_velocity(raw_output, x_t, t, eps)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def flow_matching_loss(
    raw_output: Float[Tensor, "b ..."],
    x0: Float[Tensor, "b ..."],
    x1: Float[Tensor, "b ..."],
    x_t: Float[Tensor, "b ..."],
    t: Float[Tensor, "b"],
    prediction: Prediction = "velocity",
    eps: float = 0.05,
) -> Float[Tensor, ""]:
    """Plain MSE in velocity space. For x-prediction the output is converted first (as JiT does), so
    the loss weighting is the same for both parameterisations. Computed in float32 for bf16 outputs."""
    v_hat = model_velocity(raw_output.float(), x_t.float(), t.float(), prediction, eps)
    return F.mse_loss(v_hat, velocity_target(x0.float(), x1.float()))


# ----------------------------------------------------------------------------- timestep samplers


class TimestepSampler(Protocol):
    def __call__(
        self, batch_size: int, *, generator: torch.Generator | None = None, device=None
    ) -> Float[Tensor, "b"]: ...


def _draw(fn: Callable, batch_size: int, generator: torch.Generator | None, device) -> Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return fn(batch_size, generator=generator, device=gen_device).to(device)


@dataclass
class LogitNormal:
    """t = sigmoid(n), n ~ N(mean, std): SD3's default, concentrating training on mid times."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, "b"]:
        n = _draw(torch.randn, batch_size, generator, device)
        return torch.sigmoid(n * self.std + self.mean)


@dataclass
class Uniform:
    """t ~ U[0, 1)."""

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, "b"]:
        return _draw(torch.rand, batch_size, generator, device)


def shift_time(t: Float[Tensor, "..."], shift: float) -> Float[Tensor, "..."]:
    """SD3 shift sigma' = s*sigma / (1 + (s-1)*sigma) with sigma = 1 - t, written in our t.

    Substituting gives t' = 1 - sigma' = t / (t + s*(1 - t)): the same map as the sampler's alpha warp.
    """
    return t / (t + shift * (1 - t))


@dataclass
class ResolutionShift:
    """Wraps a base sampler and shifts its draws toward noise (shift > 1), because at higher
    resolution more pixels average out noise, so images stay recognisable at larger noise levels."""

    base: TimestepSampler
    shift: float

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, "b"]:
        return shift_time(self.base(batch_size, generator=generator, device=device), self.shift)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """SD3's shift factor alpha = sqrt(m / n) for m tokens relative to a base of n tokens."""
    return math.sqrt(num_tokens / base_tokens)


def build_timestep_sampler(name: str, shift: float | None = None, **kw) -> TimestepSampler:
    """Build a sampler by name ("logit_normal" or "uniform"); `shift` wraps it in ResolutionShift."""
    bases = {"logit_normal": LogitNormal, "uniform": Uniform}
    if name not in bases:
        raise ValueError(f"unknown timestep sampler {name!r}; expected one of {sorted(bases)}")
    sampler = bases[name](**kw)
    if shift is not None and shift != 1.0:
        sampler = ResolutionShift(sampler, float(shift))
    return sampler
