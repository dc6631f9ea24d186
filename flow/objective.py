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


def _bcast(t: Float[Tensor, " b"], like: Tensor) -> Tensor:
    """Reshape per-sample times [b] to [b, 1, 1, ...] so they broadcast over `like`."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def interpolate(
    x0: Float[Tensor, "b ..."], x1: Float[Tensor, "b ..."], t: Float[Tensor, " b"]
) -> Float[Tensor, "b ..."]:
    """Point on the straight noise->data path: x_t = t * x1 + (1 - t) * x0."""
    tb = _bcast(t, x1)
    return tb * x1 + (1 - tb) * x0


def velocity_target(x0: Float[Tensor, "b ..."], x1: Float[Tensor, "b ..."]) -> Float[Tensor, "b ..."]:
    """d x_t / dt along the straight path; constant in t."""
    return x1 - x0


def x_to_velocity(
    x1_hat: Float[Tensor, "b ..."], x_t: Float[Tensor, "b ..."], t: Float[Tensor, " b"], eps: float = 0.05
) -> Float[Tensor, "b ..."]:
    """Velocity implied by a clean-data prediction (JiT x-prediction): (x1_hat - x_t) / (1 - t).

    1 - t is clamped at `eps` because the division blows up as t -> 1 (the data end), where the
    remaining distance to travel vanishes and any error in x1_hat would be amplified without bound.
    """
    return (x1_hat - x_t) / (1 - _bcast(t, x_t)).clamp(min=eps)


def velocity_to_x(
    v: Float[Tensor, "b ..."], x_t: Float[Tensor, "b ..."], t: Float[Tensor, " b"]
) -> Float[Tensor, "b ..."]:
    """Clean-data estimate from a velocity: follow v for the remaining time 1 - t."""
    return x_t + (1 - _bcast(t, x_t)) * v


def model_velocity(
    raw_output: Float[Tensor, "b ..."],
    x_t: Float[Tensor, "b ..."],
    t: Float[Tensor, " b"],
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
    t: Float[Tensor, " b"],
    prediction: Prediction = "velocity",
    eps: float = 0.05,
    weighting: str = "none",
) -> Float[Tensor, ""]:
    """MSE in velocity space, each sample's mean weighted by `loss_weight(weighting, t)` (none: the plain MSE).
    For x-prediction the output is converted first (as JiT does), so the weighting means the same for both
    parameterisations. Computed in float32 for bf16 outputs."""
    v_hat = model_velocity(raw_output.float(), x_t.float(), t.float(), prediction, eps)
    target = velocity_target(x0.float(), x1.float())
    if weighting == "none":  # the plain MSE, computed as it always was (golden losses and exact resume rely on it)
        return F.mse_loss(v_hat, target)
    per_sample = (v_hat - target).square().flatten(1).mean(dim=1)
    return (loss_weight(weighting, t.float()) * per_sample).mean()


# ----------------------------------------------------------------------------- loss weighting

LOSS_WEIGHTINGS: tuple[str, ...] = ("none", "sigma_sqrt", "cosmap")
SIGMA_MIN = 1e-3
"""sigma_sqrt: the noise level sigma = 1 - t is clamped here, bounding the weight by 1e6. diffusers' SD3 scripts draw
sigma from a 1000-entry table whose smallest entry (without shift) is 1/1000; a continuous draw can come closer."""


def loss_weight(name: str, t: Float[Tensor, " b"]) -> Float[Tensor, " b"]:
    """The per-sample loss weight of the SD3 scripts' weighting schemes [esser2024sd3], as diffusers names them
    (training_utils.compute_loss_weighting_for_sd3), on the noise level sigma = 1 - t:

        none        1
        sigma_sqrt  sigma^-2 (despite the name): weights the data end heavily, where the velocity target is
                    the noise; clamped at SIGMA_MIN
        cosmap      2 / (pi (1 - 2 sigma + 2 sigma^2)), the density of SD3's CosMap schedule: uniform draws weighted
                    by it train, in expectation, as CosMap draws do (CosMap below), without changing the draws
    """
    sigma = 1 - t
    if name == "none":
        return torch.ones_like(t)
    if name == "sigma_sqrt":
        return sigma.clamp(min=SIGMA_MIN) ** -2
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    raise ValueError(f"unknown loss weighting {name!r}; expected one of {LOSS_WEIGHTINGS}")


# ----------------------------------------------------------------------------- timestep samplers


class TimestepSampler(Protocol):
    def __call__(
        self, batch_size: int, *, generator: torch.Generator | None = None, device=None
    ) -> Float[Tensor, " b"]: ...


def _draw(fn: Callable, batch_size: int, generator: torch.Generator | None, device) -> Tensor:
    # Draw on the generator's own device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else device
    return fn(batch_size, generator=generator, device=gen_device).to(device)


@dataclass
class LogitNormal:
    """t = sigmoid(n), n ~ N(mean, std): SD3's default, concentrating training on mid times [esser2024sd3]. A
    positive mean moves the draws toward data, as diffusers' `logit_mean` does (its draw indexes a table that runs
    from noise to data); the SD3 paper writes the density on the noise level, where a positive mean means noise."""

    mean: float = 0.0
    std: float = 1.0

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, " b"]:
        n = _draw(torch.randn, batch_size, generator, device)
        return torch.sigmoid(n * self.std + self.mean)


@dataclass
class Uniform:
    """t ~ U[0, 1)."""

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, " b"]:
        return _draw(torch.rand, batch_size, generator, device)


MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))
"""Mode: the scales s for which f_mode is monotone, so that its draws have a density [esser2024sd3]."""


@dataclass
class Mode:
    """SD3's mode sampling [esser2024sd3]: sigma = f(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U[0, 1), and
    t = 1 - sigma. s > 0 puts more draws at mid times, s < 0 more at both ends, s = 0 is uniform. f(1 - u) =
    1 - f(u), so the density is symmetric about 1/2 and reads the same in SD3's time (the noise level) as in ours."""

    scale: float = 1.29

    def __post_init__(self) -> None:
        lo, hi = MODE_SCALE_RANGE
        if not lo <= self.scale <= hi:  # also False for NaN
            raise ValueError(f"mode scale {self.scale} must be in [{lo}, {hi:.4f}] (2 / (pi - 2)): outside it "
                             "f_mode is not monotone and the draws leave [0, 1]")

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, " b"]:
        u = _draw(torch.rand, batch_size, generator, device)
        sigma = 1 - u - self.scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return 1 - sigma


@dataclass
class CosMap:
    """SD3's CosMap schedule [esser2024sd3]: sigma = 1 - 1 / (tan(pi u / 2) + 1), u ~ U[0, 1), t = 1 - sigma, whose
    density 2 / (pi (1 - 2 sigma + 2 sigma^2)) matches a cosine schedule's log-SNR; symmetric about 1/2 as Mode's."""

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, " b"]:
        u = _draw(torch.rand, batch_size, generator, device)
        return 1 / (torch.tan(math.pi * u / 2) + 1)


def shift_time(t: Float[Tensor, "..."], shift: float) -> Float[Tensor, "..."]:
    """SD3 shift sigma' = s*sigma / (1 + (s-1)*sigma) with sigma = 1 - t, written in our t.

    Substituting gives t' = 1 - sigma' = t / (t + s*(1 - t)): the same map as the sampler's alpha warp.
    """
    return t / (t + shift * (1 - t))


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """SD3's shift factor alpha = sqrt(m / n) for m tokens relative to a base of n tokens."""
    return math.sqrt(num_tokens / base_tokens)


SAMPLERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "logit_normal": (LogitNormal, ("mean", "std")),
    "uniform": (Uniform, ()),
    "mode": (Mode, ("scale",)),
    "cosmap": (CosMap, ()),
}
"""Timestep scheme name -> (its sampler, the parameters it takes)."""


def build_timestep_sampler(name: str, **kw) -> TimestepSampler:
    """Build a sampler by name (SAMPLERS) with its parameters. The resolution shift is RectifiedFlow's, applied to
    each batch's draws at its own token count (flow/rectified_flow.py), not a property of the sampler."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown timestep sampler {name!r}; expected one of {sorted(SAMPLERS)}")
    cls, params = SAMPLERS[name]
    unknown = sorted(set(kw) - set(params))
    if unknown:
        raise ValueError(f"timestep sampler {name!r} takes {list(params) or 'no parameters'}, not {unknown}")
    return cls(**kw)
