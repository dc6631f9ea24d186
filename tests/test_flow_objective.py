"""Rectified-flow objective checked against closed forms (t = 0 noise, t = 1 data)."""

import math

import pytest
import torch

from flow import (
    LogitNormal,
    RectifiedFlow,
    Uniform,
    build_timestep_sampler,
    flow_matching_loss,
    interpolate,
    model_velocity,
    resolution_shift,
    velocity_target,
    velocity_to_x,
    x_to_velocity,
)

N = 200_000  # samples for distribution checks; standard error of a mean ~ 0.0022 * std


def _pair(b=4, shape=(3, 5, 5), dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, *shape, generator=g, dtype=dtype), torch.randn(b, *shape, generator=g, dtype=dtype)


def test_interpolate_endpoints_and_midpoint():
    x0, x1 = _pair()
    assert torch.equal(interpolate(x0, x1, torch.zeros(4, dtype=torch.float64)), x0)  # t = 0: noise
    assert torch.equal(interpolate(x0, x1, torch.ones(4, dtype=torch.float64)), x1)  # t = 1: data
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    xt = interpolate(x0, x1, t)
    torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1])  # per-sample t broadcasts
    torch.testing.assert_close(xt[2], (x0[2] + x1[2]) / 2)


def test_velocity_target_is_time_derivative():
    x0, x1 = _pair()
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    h = 1e-4  # central difference in float64; exact up to rounding for any path quadratic in t
    dxdt = (interpolate(x0, x1, t + h) - interpolate(x0, x1, t - h)) / (2 * h)
    torch.testing.assert_close(dxdt, velocity_target(x0, x1), rtol=1e-9, atol=1e-9)


def test_x_velocity_round_trip():
    x0, x1 = _pair()
    t = torch.tensor([0.0, 0.3, 0.6, 0.9], dtype=torch.float64)  # 1 - t > eps: clamp inactive
    xt = interpolate(x0, x1, t)
    v = velocity_target(x0, x1)
    torch.testing.assert_close(x_to_velocity(x1, xt, t), v)  # perfect x-pred gives the true velocity
    torch.testing.assert_close(velocity_to_x(v, xt, t), x1)
    v_any = torch.randn_like(v)
    torch.testing.assert_close(x_to_velocity(velocity_to_x(v_any, xt, t), xt, t), v_any)


def test_x_to_velocity_clamps_near_data_end():
    x_hat, xt = _pair(b=3)
    t = torch.tensor([0.99, 1.0, 0.5], dtype=torch.float64)
    v = x_to_velocity(x_hat, xt, t, eps=0.05)
    assert torch.isfinite(v).all()
    torch.testing.assert_close(v[0], (x_hat[0] - xt[0]) / 0.05)  # 1 - 0.99 = 0.01 < eps
    torch.testing.assert_close(v[1], (x_hat[1] - xt[1]) / 0.05)
    torch.testing.assert_close(v[2], (x_hat[2] - xt[2]) / 0.5)


def test_model_velocity_dispatch():
    raw, xt = _pair(b=2)
    t = torch.tensor([0.2, 0.5], dtype=torch.float64)
    assert model_velocity(raw, xt, t) is raw
    torch.testing.assert_close(model_velocity(raw, xt, t, "x"), (raw - xt) / (1 - t).view(2, 1, 1, 1))
    with pytest.raises(ValueError, match="'eps'"):
        model_velocity(raw, xt, t, "eps")


def test_flow_matching_loss_closed_form():
    x0, x1 = _pair()
    t = torch.tensor([0.1, 0.4, 0.7, 0.9], dtype=torch.float64)
    xt = interpolate(x0, x1, t)
    raw = torch.randn_like(x0)
    ref = ((raw - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(flow_matching_loss(raw, x0, x1, xt, t).double(), ref, rtol=1e-6, atol=0)
    assert flow_matching_loss(x1 - x0, x0, x1, xt, t) < 1e-12  # perfect velocity
    assert flow_matching_loss(x1, x0, x1, xt, t, prediction="x") < 1e-10  # perfect data prediction
    v_hat = (raw - xt) / (1 - t).view(4, 1, 1, 1)  # x-pred is scored in velocity space
    ref_x = ((v_hat - (x1 - x0)) ** 2).mean()
    torch.testing.assert_close(flow_matching_loss(raw, x0, x1, xt, t, "x").double(), ref_x, rtol=1e-5, atol=0)


def test_logit_normal_moments():
    for mean, std in [(0.0, 1.0), (-0.5, 0.7)]:
        t = LogitNormal(mean, std)(N, generator=torch.Generator().manual_seed(1)).double()
        assert t.shape == (N,) and ((t > 0) & (t < 1)).all()
        logit = torch.log(t / (1 - t))
        assert abs(logit.mean().item() - mean) < 0.01
        assert abs(logit.std().item() - std) < 0.01


def test_uniform_range_and_moments():
    t = Uniform()(N, generator=torch.Generator().manual_seed(2)).double()
    assert ((t >= 0) & (t <= 1)).all()
    assert abs(t.mean().item() - 0.5) < 0.005
    assert abs(t.var().item() - 1 / 12) < 0.002


def test_samplers_are_reproducible_with_generator():
    s = LogitNormal()
    a = s(16, generator=torch.Generator().manual_seed(3))
    b = s(16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.device.type == "cpu"


def _shifted_draws(base, shift: float | None) -> torch.Tensor:
    """The times RectifiedFlow.draw gives a batch of N one-pixel samples (after its noise draw), shifted by `shift`."""
    return RectifiedFlow(base, shift=shift).draw(torch.zeros(N, 1), torch.Generator().manual_seed(4))[1].double()


def test_resolution_shift_closed_form():
    base = LogitNormal()
    gen = torch.Generator().manual_seed(4)
    torch.randn(N, 1, generator=gen)  # the noise the objective draws first
    t = base(N, generator=gen).double()
    same = _shifted_draws(base, 1.0)
    torch.testing.assert_close(same, t)
    shifted = _shifted_draws(base, 3.0)
    sigma = 1 - t  # SD3 shifts the noise level
    torch.testing.assert_close(shifted, 1 - 3 * sigma / (1 + 2 * sigma), rtol=1e-6, atol=1e-6)
    # Median of sigmoid(N(0,1)) is 1/2; the shift maps it to sigma' = 1.5/2 = 0.75, i.e. t' = 0.25.
    assert shifted.median() < t.median()
    assert abs(shifted.median().item() - 0.25) < 0.01


def test_resolution_shift_factor():
    assert resolution_shift(1024) == 2.0
    assert resolution_shift(256) == 1.0
    assert math.isclose(resolution_shift(4096, base_tokens=1024), 2.0)


def test_build_timestep_sampler():
    assert isinstance(build_timestep_sampler("uniform"), Uniform)
    ln = build_timestep_sampler("logit_normal", mean=0.5, std=2.0)
    assert ln == LogitNormal(0.5, 2.0)
    flow = RectifiedFlow.from_config(dict(name="logit_normal", shift=3.0, std=0.5), "velocity", 16, 1)
    assert flow.timesteps == LogitNormal(0.0, 0.5) and flow.shift == 3.0  # the base sampler, shifted by the flow
    with pytest.raises(ValueError, match="'cosine'"):
        build_timestep_sampler("cosine")
