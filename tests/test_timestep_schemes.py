"""The SD3 scripts' timestep schemes and loss weightings by name (flow/objective.py), against closed forms and
against diffusers' own training_utils (its draws index a noise-to-data table; sigma = 1 - t here).

Densities: a Kolmogorov-Smirnov test of 200,000 draws against each scheme's analytic CDF (scipy's kstest; the
CDFs are written here from the SD3 paper's definitions [esser2024sd3], with f_mode inverted by root finding), and
the histogram at a few points against the analytic density."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from flow import CosMap, LogitNormal, Mode, RectifiedFlow, build_timestep_sampler, flow_matching_loss, loss_weight

N = 200_000
P_MIN = 1e-3  # a correct sampler fails one of these seeded tests with probability 1e-3


def draws(sampler, seed: int = 0) -> np.ndarray:
    return sampler(N, generator=torch.Generator().manual_seed(seed)).double().numpy()


def f_mode(u, s):
    """SD3's f_mode: the noise level drawn from u ~ U(0, 1)."""
    return 1 - u - s * (np.cos(np.pi * u / 2) ** 2 - 1 + u)


def mode_cdf(y, s):
    """P(t <= y) for t = 1 - f_mode(u): f_mode decreases, so P(f(u) >= 1 - y) = P(u <= f^-1(1 - y))."""
    y = np.atleast_1d(y)
    return np.array([optimize.brentq(lambda u, v=v: f_mode(u, s) - (1 - v), 0, 1, xtol=1e-14) if 0 < v < 1
                     else float(v >= 1) for v in y])


def cosmap_cdf(y):
    """t = 1 / (tan(pi u / 2) + 1) decreases in u: P(t <= y) = 1 - (2 / pi) atan((1 - y) / y)."""
    y = np.clip(y, 1e-300, 1)
    return 1 - 2 / np.pi * np.arctan((1 - y) / y)


def cosmap_pdf(y):
    return 2 / (np.pi * (1 - 2 * y + 2 * y**2))


def histogram_density(t: np.ndarray, at: float, half_width: float = 0.01) -> float:
    return float(((t > at - half_width) & (t < at + half_width)).mean() / (2 * half_width))


@pytest.mark.parametrize("scale", [1.29, 1.0, 0.0, -0.5])
def test_mode_draws_follow_f_mode(scale):
    t = draws(Mode(scale))
    assert ((t >= 0) & (t <= 1)).all()
    assert stats.kstest(t, lambda y: mode_cdf(y, scale)).pvalue > P_MIN
    # The density at 1/2 is 1 / |f'(1/2)| = 1 / (1 + s - s pi / 2): mid times are favoured for s > 0.
    expected = 1 / (1 + scale - scale * math.pi / 2)
    assert histogram_density(t, 0.5) == pytest.approx(expected, rel=0.05)


def test_mode_scale_outside_its_range_is_refused():
    for bad in (-1.01, 1.76, float("nan")):
        with pytest.raises(ValueError, match="mode scale"):
            Mode(bad)


def test_cosmap_draws_follow_its_density():
    t = draws(CosMap())
    assert ((t >= 0) & (t <= 1)).all()
    assert stats.kstest(t, cosmap_cdf).pvalue > P_MIN
    for at in (0.1, 0.5, 0.9):
        assert histogram_density(t, at) == pytest.approx(cosmap_pdf(at), rel=0.05)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (0.5, 0.7)])
def test_logit_normal_cdf_and_the_sign_of_its_mean(mean, std):
    t = draws(LogitNormal(mean, std))
    cdf = lambda y: stats.norm.cdf((np.log(y) - np.log1p(-y) - mean) / std)  # noqa: E731
    assert stats.kstest(t, cdf).pvalue > P_MIN
    assert np.median(t) == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.005)  # mean > 0: toward data (t = 1)


def test_the_weightings_are_the_sd3_formulas_on_sigma():
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=torch.float64)
    sigma = 1 - t
    torch.testing.assert_close(loss_weight("none", t), torch.ones_like(t))
    # sigma^-2, bounded at the data end (sigma = 0) by the clamp at 1e-3.
    want = torch.tensor([1.0, 1 / 0.75**2, 4.0, 100.0, 1e6], dtype=torch.float64)
    torch.testing.assert_close(loss_weight("sigma_sqrt", t), want)
    torch.testing.assert_close(loss_weight("cosmap", t), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    with pytest.raises(ValueError, match="'snr'"):
        loss_weight("snr", t)


def test_cosmap_weighting_is_a_density_on_the_unit_interval():
    """As a weight on uniform draws it must integrate to 1 (it is CosMap's density): quadrature in float64."""
    y = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    assert torch.trapezoid(loss_weight("cosmap", y), y).item() == pytest.approx(1.0, abs=1e-9)


def test_weighted_loss_is_the_weighted_mean_of_per_sample_mses():
    g = torch.Generator().manual_seed(0)
    x0, x1, raw = (torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95], dtype=torch.float64)
    x_t = t.view(4, 1, 1, 1) * x1 + (1 - t.view(4, 1, 1, 1)) * x0
    per_sample = ((raw - (x1 - x0)) ** 2).mean(dim=(1, 2, 3))
    sigma = 1 - t
    for name, w in (("sigma_sqrt", sigma**-2), ("cosmap", 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))):
        got = flow_matching_loss(raw, x0, x1, x_t, t, weighting=name).double()
        torch.testing.assert_close(got, (w * per_sample).mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(flow_matching_loss(raw, x0, x1, x_t, t, weighting="none").double(), per_sample.mean(),
                               rtol=1e-6, atol=0)


# ---- against diffusers' training_utils --------------------------------------------------------------------------


def diffusers_t(scheme: str, seed: int, **kw) -> np.ndarray:
    """t = 1 - sigma of the SD3 scripts' draw: u from compute_density_for_timestep_sampling indexes the training
    scheduler's table (timesteps 1000 ... 1, sigma = timestep / 1000 without shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    torch.manual_seed(seed)
    u = compute_density_for_timestep_sampling(scheme, N, **kw)
    sigma = scheduler.sigmas[(u * 1000).long()]
    return (1 - sigma).double().numpy()


@pytest.mark.parametrize("scheme, ours, kw", [
    ("logit_normal", LogitNormal(0.5, 0.8), dict(logit_mean=0.5, logit_std=0.8)),
    ("mode", Mode(1.29), dict(mode_scale=1.29)),
], ids=["logit_normal", "mode"])
def test_draws_match_diffusers_sd3_scripts(scheme, ours, kw):
    """Two-sample KS: the same distribution of t, the sign of logit_mean included. diffusers' table rounds to 1/1000,
    a KS distance of at most 0.001, under the 0.0044 the test can resolve at this n."""
    theirs = diffusers_t(scheme, 1, **kw)
    assert stats.ks_2samp(draws(ours, 2), theirs).pvalue > P_MIN


def test_weights_match_diffusers_compute_loss_weighting_for_sd3():
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.linspace(0.001, 1, 1000, dtype=torch.float64)
    for name in ("sigma_sqrt", "cosmap", "none"):
        theirs = compute_loss_weighting_for_sd3(name, sigmas=sigmas).double()
        torch.testing.assert_close(loss_weight(name, 1 - sigmas), theirs, rtol=1e-6, atol=0)


# ---- by name, from the config --------------------------------------------------------------------------------


def test_from_config_builds_each_scheme_with_its_own_parameters():
    common = dict(mean=0.3, std=0.9, mode_scale=0.5, shift=None, weighting="cosmap")
    flow = RectifiedFlow.from_config(dict(common, name="mode"), "velocity", base_grid=8, patch=2)
    assert flow.timesteps == Mode(0.5) and flow.weighting == "cosmap"
    assert RectifiedFlow.from_config(dict(common, name="logit_normal"), "velocity", 8, 2).timesteps == \
        LogitNormal(0.3, 0.9)
    assert RectifiedFlow.from_config(dict(common, name="uniform"), "velocity", 8, 2).timesteps == \
        build_timestep_sampler("uniform")
    assert isinstance(RectifiedFlow.from_config(dict(common, name="cosmap"), "velocity", 8, 2).timesteps, CosMap)
    # A checkpoint's config from before these keys existed: the defaults.
    old = RectifiedFlow.from_config(dict(name="logit_normal", mean=0.0, std=1.0, shift=None), "x", 8, 2)
    assert old.timesteps == LogitNormal() and old.weighting == "none"
    with pytest.raises(ValueError, match="train.timesteps.weighting='snr'"):
        RectifiedFlow.from_config(dict(common, name="mode", weighting="snr"), "velocity", 8, 2)


def test_config_ranges_name_the_key():
    from omegaconf import OmegaConf

    from trainer.config import RunConfig, check_ranges
    from trainer.errors import ConfigError

    base = OmegaConf.structured(RunConfig)
    base.stage = 2
    for key, value, match in (("name", "cosine", "train.timesteps.name='cosine'"),
                              ("mode_scale", 1.8, "train.timesteps.mode_scale=1.8"),
                              ("weighting", "snr", "train.timesteps.weighting='snr'")):
        cfg = base.copy()
        cfg.train.timesteps[key] = value
        with pytest.raises(ConfigError, match=match):
            check_ranges(cfg)
    ok = base.copy()
    ok.train.timesteps.name, ok.train.timesteps.weighting = "mode", "sigma_sqrt"
    check_ranges(ok)


def test_the_objective_applies_its_weighting_to_its_own_draws():
    """RectifiedFlow.loss with weighting=cosmap: the noise then the times from the generator (its documented draw
    order), each sample's MSE weighted by CosMap's density at sigma = 1 - t, recomputed here in float64."""
    x1 = torch.randn(6, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731 (velocity 0: the loss is |x1 - x0|^2 per sample)
    flow = RectifiedFlow(Mode(1.0), weighting="cosmap")
    got = flow.loss(model, x1, {}, torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(x1.shape, generator=gen)
    t = Mode(1.0)(6, generator=gen).double()
    sigma = 1 - t
    per_sample = ((x1 - x0).double() ** 2).mean(dim=(1, 2, 3))
    want = (2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)) * per_sample).mean()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    assert abs(got.item() - per_sample.mean().item()) > 1e-3  # the weighting changes it
