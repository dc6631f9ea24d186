"""The ODE sampler checked against exact flows, a hand-written Euler loop and two-call guidance."""

import pytest
import torch
from torch import nn

from flow import alpha_warp, guided_velocity, sample, time_grid

F64 = torch.float64


# ----------------------------------------------------------------------------- time warp


@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0, 3.0, 7.5])
def test_alpha_warp_fixes_endpoints_and_is_monotone(alpha):
    s = torch.linspace(0, 1, 10_001, dtype=F64)
    w = alpha_warp(s, alpha)
    assert w[0] == 0 and w[-1] == 1
    assert (w.diff() > 0).all()
    torch.testing.assert_close(w, s / (s + alpha * (1 - s)))  # closed form


def test_alpha_warp_identity_and_bias_toward_noise():
    s = torch.linspace(0, 1, 101, dtype=F64)
    torch.testing.assert_close(alpha_warp(s, 1.0), s)
    assert alpha_warp(torch.tensor(0.5, dtype=F64), 3.0).item() == pytest.approx(0.25)
    below = [(time_grid(24, a) < 0.5).sum().item() for a in (1.0, 3.0)]
    assert below[1] > below[0]


def test_time_grid():
    g = time_grid(10, 3.0)
    assert g.shape == (11,) and g.dtype == torch.float32
    assert g[0] == 0 and g[-1] == 1
    s = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(g.double(), s / (s + 3 * (1 - s)), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        time_grid(0)


# ----------------------------------------------------------------------------- linear ODE, exact flow

A = torch.tensor([[-0.5, -3.0], [3.0, -0.5]], dtype=F64)  # damped rotation
X0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
EXACT = X0 @ torch.linalg.matrix_exp(A).T  # x(1) = expm(A) x(0)


def linear_model(x, t):
    return x @ A.to(x.dtype).T


def _err(**kw):
    return (sample(linear_model, X0, {}, **kw).double() - EXACT).norm().item()


@pytest.mark.parametrize(
    "method, steps, order",
    [("euler", 32, 1), ("midpoint", 16, 2), ("rk4", 8, 4)],
)
def test_convergence_order(method, steps, order):
    # Halving the step size divides the global error by ~2**order.
    ratio = _err(method=method, steps=steps) / _err(method=method, steps=2 * steps)
    assert 0.85 * 2**order < ratio < 1.15 * 2**order, ratio


def test_dopri5_matches_exact_flow():
    out = sample(linear_model, X0, {}, method="dopri5", rtol=1e-6, atol=1e-6).double()
    torch.testing.assert_close(out, EXACT, rtol=0, atol=1e-5)


def test_unknown_method():
    with pytest.raises(ValueError, match="'leapfrog'"):
        sample(linear_model, X0, {}, method="leapfrog")


# ----------------------------------------------------------------------------- rectified flow, point mass


@pytest.mark.parametrize("method", ["euler", "midpoint"])
def test_point_mass_x_prediction_follows_straight_line(method):
    # For data concentrated at x1*, the ideal x-predictor outputs x1* everywhere; the exact flow is the
    # straight line x_t = t x1* + (1 - t) x0, whose velocity is constant, so any RK method is exact.
    x1_star = torch.tensor([[2.0, -1.0, 0.5]], dtype=F64)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    steps = 8  # the last grid time before 1 is 0.875, so 1 - t stays above the eps clamp
    out, traj = sample(
        lambda x, t: x1_star.to(x.dtype).expand_as(x),
        x0,
        {},
        steps=steps,
        method=method,
        prediction="x",
        return_trajectory=True,
    )
    t = torch.linspace(0, 1, steps + 1, dtype=F64).view(-1, 1, 1)
    torch.testing.assert_close(traj.double(), t * x1_star + (1 - t) * x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.double(), x1_star.expand_as(x0), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- odeint vs hand-written Euler


class ToyNet(nn.Module):
    """Nonlinear in x, depends on t and on a conditioning tensor y [b, L, d]."""

    def __init__(self, dim=4, cond_dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) * 0.5)
        self.proj = nn.Parameter(torch.randn(cond_dim, dim, generator=g))
        self.calls: list[int] = []  # batch size of every forward
        self.dtypes: list[torch.dtype] = []  # dtype of x at every forward

    def forward(self, x, t, y):
        assert t.shape == (x.shape[0],)
        self.calls.append(x.shape[0])
        self.dtypes.append(x.dtype)
        c = y.mean(1) @ self.proj.to(x.dtype)
        return torch.tanh(x @ self.w.to(x.dtype)) * (1 + t[:, None].to(x.dtype)) + c


def _inputs(b=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, generator=g)
    cond = {"y": torch.randn(b, 5, 6, generator=g)}
    uncond = {"y": torch.zeros(1, 5, 6)}  # batch-1 null embedding, broadcast to the batch
    return x, cond, uncond


def test_odeint_matches_hand_written_euler_on_warped_grid():
    net, (x0, cond, _) = ToyNet(), _inputs()
    steps, alpha = 12, 3.0
    out, traj = sample(net, x0, cond, steps=steps, alpha=alpha, return_trajectory=True)

    s = torch.linspace(0, 1, steps + 1, dtype=F64)
    ts = s / (s + alpha * (1 - s))  # warped grid, written out independently
    x, ref = x0.double(), [x0.double()]
    with torch.no_grad():
        for k in range(steps):  # Euler: evaluate at the left end of every interval
            x = x + (ts[k + 1] - ts[k]) * net(x, ts[k].expand(x.shape[0]), cond["y"].double())
            ref.append(x)
    torch.testing.assert_close(traj.double(), torch.stack(ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(out.double(), x, rtol=0, atol=1e-6)


def test_trajectory_shape_and_start():
    net, (x0, cond, _) = ToyNet(), _inputs()
    for method in ("euler", "dopri5"):
        out, traj = sample(net, x0, cond, steps=7, method=method, return_trajectory=True)
        assert traj.shape == (8, *x0.shape) and traj.dtype == torch.float32
        assert torch.equal(traj[0], x0) and torch.equal(traj[-1], out)
        assert not out.requires_grad  # sampling runs under no_grad


# ----------------------------------------------------------------------------- classifier-free guidance


def test_guidance_scale_one_is_conditional():
    net, (x, cond, uncond) = ToyNet(), _inputs()
    t = torch.tensor(0.4)
    with torch.no_grad():
        ref = net(x, t.expand(3), **cond)
        net.calls.clear()
        assert torch.equal(guided_velocity(net, x, t, cond, uncond, cfg_scale=1.0), ref)
        assert torch.equal(guided_velocity(net, x, t, cond, None, cfg_scale=5.0), ref)
    assert net.calls == [3, 3]  # no unconditional half was run


def test_guidance_matches_two_separate_calls_in_one_forward():
    net, (x, cond, uncond) = ToyNet(), _inputs()
    t, s = torch.tensor(0.3), 4.0
    with torch.no_grad():
        v_c = net(x.double(), t.expand(3), cond["y"].double())
        v_u = net(x.double(), t.expand(3), uncond["y"].double().expand(3, -1, -1))
        net.calls.clear()
        out = guided_velocity(net, x, t, cond, uncond, cfg_scale=s)
    assert net.calls == [6]  # one batched forward of both halves
    torch.testing.assert_close(out.double(), v_u + s * (v_c - v_u), rtol=0, atol=1e-5)


def test_guidance_interval_is_closed_and_skips_uncond_outside():
    net, (x, cond, uncond) = ToyNet(), _inputs()
    with torch.no_grad():
        ref = net(x, torch.full((3,), 0.7), **cond)
        net.calls.clear()
        out = guided_velocity(net, x, 0.7, cond, uncond, cfg_scale=4.0, cfg_interval=(0.0, 0.5))
        assert torch.equal(out, ref) and net.calls == [3]
        guided_velocity(net, x, 0.5, cond, uncond, cfg_scale=4.0, cfg_interval=(0.0, 0.5))
    assert net.calls == [3, 6]  # t == upper bound is inside


def test_sample_with_guidance_counts_and_dtype():
    net, (x0, cond, uncond) = ToyNet(), _inputs()
    sample(net, x0, cond, uncond, steps=6, cfg_scale=3.0, cfg_interval=(0.0, 0.5))
    # Uniform grid 0, 1/6, ..., 5/6 evaluated by Euler: t <= 0.5 for the first four steps.
    assert net.calls == [6, 6, 6, 6, 3, 3]
    low = sample(net, x0, cond, uncond, steps=6, cfg_scale=3.0, model_dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and net.dtypes[-1] == torch.bfloat16
    torch.testing.assert_close(low, sample(net, x0, cond, uncond, steps=6, cfg_scale=3.0), rtol=0, atol=0.1)


def test_cuda_graphs_refuse_a_cpu_sample():
    with pytest.raises(ValueError, match="cuda_graphs=True needs"):
        sample(lambda x, t: torch.zeros_like(x), torch.zeros(1, 2), {}, steps=2, cuda_graphs=True)


@pytest.mark.parametrize("name, overrides", [("mmDiT-debug/4", {}), ("mmDiT-debug/4", {"text_pad_multiple": 16}),
                                             ("PixelDiT-debug/8", {"conditioning": "text", "input_size": 16})])
def test_prepared_captions_give_the_sampler_the_same_result_as_a_plain_loop(name, overrides):
    """sample() hands an mmDiT its captions' keys and values once (prepare_condition) instead of at every step:
    the result equals a hand-written guided Euler loop over the unprepared model, and the model with prepared
    keys equals the model with the captions."""
    from models import build_model
    from tests.helpers import randomize_zero_inits, text_inputs

    model = build_model(name, **overrides).eval()
    randomize_zero_inits(model)
    cfg = model.config
    text, mask = text_inputs(cfg, 3, [5, 1, cfg.text_len])
    null = dict(text=torch.zeros_like(text[:1]), text_mask=torch.zeros_like(mask[:1]))
    x0 = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size, generator=torch.Generator().manual_seed(1))
    t = torch.full((3,), 0.3)
    with torch.no_grad():
        direct = model(x0, t, text=text, text_mask=mask)
        prepared = model(x0, t, **model.prepare_condition(text=text, text_mask=mask))
    torch.testing.assert_close(prepared, direct, rtol=1e-5, atol=1e-6)

    steps, scale = 4, 3.0
    x = x0.clone()
    grid = time_grid(steps)
    with torch.no_grad():
        for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
            tb = t0.expand(3)
            v_c = model(x, tb, text=text, text_mask=mask)
            v_u = model(x, tb, text=null["text"].expand_as(text), text_mask=null["text_mask"].expand_as(mask))
            x = x + (t1 - t0) * (v_u + scale * (v_c - v_u))
    out = sample(model, x0, dict(text=text, text_mask=mask), null, steps=steps, cfg_scale=scale)
    # float32 rounding of the two summation orders, amplified by guidance 3 over 4 steps of a random model
    torch.testing.assert_close(out, x, rtol=1e-4, atol=5e-5)
