"""The rectified-flow training objective as one object, minRF-style: draws, resolution shift, path, loss.

    flow = RectifiedFlow(LogitNormal(0, 1), prediction="x", shift="auto", base_tokens=64, patch=4)
    loss = flow.loss(model, x1, cond, generator)

`loss` is the whole sequence a training step (and the held-out loss, and scripts/bench/train.py) runs; nobody
writes it out again. The order of the random draws is part of the contract exact resume relies on: every draw of
a micro-batch comes from one generator seeded by (seed, step, virtual rank) (trainer/loop.py), and the objective
takes, after any dropout draws the conditioning made from the same generator,

    1. the noise x0 ~ N(0, I), shaped like x1;
    2. the times t, one per sample, from the base sampler; then the resolution shift maps them (no draw).

The loss weighting (flow/objective.py: loss_weight) draws nothing either.

Convention: t = 0 is noise, t = 1 is data (flow/objective.py).
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from flow.objective import (
    LOSS_WEIGHTINGS,
    SAMPLERS,
    Prediction,
    TimestepSampler,
    build_timestep_sampler,
    flow_matching_loss,
    interpolate,
    resolution_shift,
    shift_time,
)

Shift = float | Literal["auto"] | None


@dataclass
class RectifiedFlow:
    timesteps: TimestepSampler
    """The base time sampler (logit-normal, uniform, mode or cosmap: flow/objective.py), without any shift."""
    prediction: Prediction = "velocity"
    """What the network outputs: the velocity x1 - x0, or the clean data x1 (JiT), converted before the loss."""
    shift: Shift = None
    """SD3's resolution shift [esser2024sd3], the one place it is applied to training times: None or 1 none; a
    number; "auto" = sqrt(tokens / base_tokens) for each batch's own token grid (so every aspect-ratio bucket gets
    its own). A shift > 1 moves the draws toward noise: at a higher resolution more pixels average the noise out,
    so an image stays recognisable at larger noise levels."""
    base_tokens: int = 256
    """Tokens of the base grid the shift is measured against (base_grid ** 2)."""
    patch: int = 1
    """Patch side: tokens = (H / patch) * (W / patch)."""
    eps: float = 0.05
    """x-prediction: 1 - t is clamped at eps when turning x1_hat into a velocity (flow/objective.py)."""
    weighting: str = "none"
    """The per-sample loss weight by time (none, sigma_sqrt, cosmap: flow/objective.py loss_weight)."""

    @classmethod
    def from_config(
        cls, timesteps: dict, prediction: Prediction, base_grid: int, patch: int
    ) -> "RectifiedFlow":
        """From `train.timesteps` ({name, mean, std, mode_scale, shift, weighting}: trainer/config.py) and the model's
        base grid and patch. Keys a scheme does not take are ignored, missing ones (a checkpoint's config from before
        they existed) take the samplers' defaults."""
        ts = dict(timesteps)
        name = ts.get("name", "logit_normal")
        if name not in SAMPLERS:
            raise ValueError(f"train.timesteps.name={name!r}: expected one of {', '.join(SAMPLERS)}")
        weighting = ts.get("weighting") or "none"
        if weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"train.timesteps.weighting={weighting!r}: expected one of {', '.join(LOSS_WEIGHTINGS)}")
        shift = ts.get("shift")
        if shift is not None and shift != "auto":
            shift = float(shift)
            if not (math.isfinite(shift) and shift > 0):
                raise ValueError(f"train.timesteps.shift={shift}: expected null, auto or a positive number")
        config_keys = {"mean": "mean", "std": "std", "scale": "mode_scale"}  # sampler parameter -> config key
        params = {p: ts[config_keys[p]] for p in SAMPLERS[name][1] if ts.get(config_keys[p]) is not None}
        return cls(build_timestep_sampler(name, **params), prediction, shift, base_grid**2, patch,
                   weighting=weighting)

    def shift_for(self, height: int, width: int) -> float | None:
        """The shift for an input of height x width (latent) pixels, or None for none."""
        if self.shift == "auto":
            return resolution_shift((height // self.patch) * (width // self.patch), self.base_tokens)
        return self.shift

    def draw(
        self, x1: Float[Tensor, "b ..."], generator: torch.Generator | None
    ) -> tuple[Float[Tensor, "b ..."], Float[Tensor, " b"]]:
        """(x0, t) for a batch x1, in the documented order: the noise first, then the times."""
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        t = self.timesteps(x1.shape[0], generator=generator, device=x1.device)
        shift = self.shift_for(*x1.shape[-2:])
        if shift is not None and shift != 1.0:
            t = shift_time(t, shift)
        return x0, t

    def loss(self, model, x1: Float[Tensor, "b ..."], cond: dict, generator: torch.Generator | None) -> Tensor:
        """The flow-matching loss of `model(x_t, t, **cond)` on x1, noise and times drawn from `generator`."""
        x0, t = self.draw(x1, generator)
        x_t = interpolate(x0, x1, t)
        return flow_matching_loss(model(x_t, t, **cond), x0, x1, x_t, t, prediction=self.prediction, eps=self.eps,
                                  weighting=self.weighting)
