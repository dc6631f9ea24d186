"""The one ODE sampler used by training previews, the CLI and the Gradio app.

It integrates dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) with torchdiffeq, optionally with
classifier-free guidance, on a time grid warped to spend more steps near noise.
"""

from collections.abc import Callable

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor
from torchdiffeq import odeint

from flow.methods import ADAPTIVE_METHODS, FIXED_METHODS
from flow.objective import Prediction, model_velocity, shift_time

Model = Callable[..., Tensor]


def alpha_warp(t: Float[Tensor, "..."], alpha: float) -> Float[Tensor, "..."]:
    """t / (t + alpha (1 - t)): fixes 0 and 1, monotone for alpha > 0, identity at alpha = 1.

    alpha > 1 packs grid points near t = 0 (noise), where the coarse image layout is decided. It is
    the same map as SD3's training-time resolution shift, so one shift serves both.
    """
    return shift_time(t, alpha)


def time_grid(steps: int, alpha: float = 1.0, device=None, dtype=torch.float32) -> Float[Tensor, " n"]:
    """steps + 1 warped times from 0 (noise) to 1 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    # Warp in float64 so the endpoints land exactly on 0 and 1 before the cast.
    grid = alpha_warp(torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64), alpha)
    return grid.to(device=device, dtype=dtype)


def _pair(c, u):
    """Stack a conditional value with its unconditional counterpart along the batch dim."""
    if not torch.is_tensor(c):
        return c  # non-tensor options (flags, sizes) are shared by both halves
    return torch.cat([c, u.expand_as(c)])  # expand lets a batch-1 "null" embedding serve every sample


def guided_velocity(
    model: Model,
    x: Float[Tensor, "b ..."],
    t: Float[Tensor, ""] | float,
    cond: dict,
    uncond: dict | None = None,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    *,
    prediction: Prediction = "velocity",
    eps: float = 0.05,
) -> Float[Tensor, "b ..."]:
    """Velocity at (x, t) with classifier-free guidance v_u + s (v_c - v_u).

    Both halves go through ONE batched forward (twice the batch, half the kernel launches). Outside the
    closed `cfg_interval` guidance is skipped and so is the unconditional half, which saves compute
    where guidance would only hurt (e.g. late steps that oversaturate).
    """
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    lo, hi = cfg_interval
    guide = uncond is not None and cfg_scale != 1.0 and lo <= float(t) <= hi
    if not guide:
        t_b = t.expand(x.shape[0])
        return model_velocity(model(x, t_b, **cond), x, t_b, prediction, eps)

    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} vs {sorted(uncond)}")
    x2 = torch.cat([x, x])
    t2 = t.expand(x2.shape[0])
    out = model(x2, t2, **{k: _pair(v, uncond[k]) for k, v in cond.items()})
    # Convert before guiding; the conversion is affine in the output, so the order would not matter.
    v_c, v_u = rearrange(model_velocity(out, x2, t2, prediction, eps), "(two b) ... -> two b ...", two=2)
    return v_u + cfg_scale * (v_c - v_u)


def _cast_model(model: Model, dtype: torch.dtype) -> Model:
    """Run the model in `dtype` but hand float32 back so the ODE state never loses precision.
    t stays float32: in bf16 neighbouring grid times near t = 1 would round to the same value."""

    def net(x, t, **cond):
        return model(x.to(dtype), t, **_cast_cond(cond, dtype)).float()

    return net


def _graphed(net: Model) -> Model:
    """`net` captured into CUDA graphs by torch.compile(mode="reduce-overhead"): one graph per input shape
    (the guided 2b batch and, outside cfg_interval, the b batch), replayed every step, so 20 steps cost 20
    launches of one graph instead of thousands of kernels. A graph's output buffer is overwritten by the next
    replay, hence the step marker and the clone."""
    compiled = torch.compile(net, mode="reduce-overhead", dynamic=False)

    def run(x, t, **cond):
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x, t, **cond).clone()

    return run


def _cast_cond(cond: dict, dtype: torch.dtype | None) -> dict:
    if dtype is None:
        return cond
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}


def prepare_conditions(
    model: Model, cond: dict, uncond: dict | None, dtype: torch.dtype | None = None
) -> tuple[dict, dict | None]:
    """Conditioning the model computes once for every step (`prepare_condition`: an mmDiT's caption keys and
    values, the same at every ODE step), from the conditioning cast to the model's `dtype`; as given for a model
    without one, or one that cannot take these."""
    prepare = getattr(model, "prepare_condition", None)
    keys = getattr(model, "condition_keys", ())
    if prepare is None or not getattr(model, "prepared_keys", ()) or set(cond) != set(keys):
        return cond, uncond
    cond, uncond = _cast_cond(cond, dtype), (_cast_cond(uncond, dtype) if uncond is not None else None)
    return prepare(**cond), (prepare(**uncond) if uncond is not None else None)


@torch.no_grad()
def sample(
    model: Model,
    x0: Float[Tensor, "b ..."],
    cond: dict,
    uncond: dict | None = None,
    *,
    steps: int = 24,
    alpha: float = 1.0,
    cfg_scale: float = 1.0,
    cfg_interval: tuple[float, float] = (0.0, 1.0),
    method: str = "euler",
    prediction: Prediction = "velocity",
    eps: float = 0.05,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    return_trajectory: bool = False,
    model_dtype: torch.dtype | None = None,
    cuda_graphs: bool = False,
) -> Float[Tensor, "b ..."] | tuple[Float[Tensor, "b ..."], Float[Tensor, "n b ..."]]:
    """Integrate from noise x0 at t = 0 to data at t = 1. Returns x1, plus the [steps + 1, b, ...]
    trajectory on the warped grid when `return_trajectory` (for adaptive methods it is interpolated).
    `cuda_graphs` (CUDA only) replays the model's forward from CUDA graphs; the first call compiles."""
    if method not in FIXED_METHODS + ADAPTIVE_METHODS:
        raise ValueError(f"unknown ODE method {method!r}; expected one of {FIXED_METHODS + ADAPTIVE_METHODS}")
    x0 = x0.float()
    cond, uncond = prepare_conditions(model, cond, uncond, model_dtype)
    net = model if model_dtype is None else _cast_model(model, model_dtype)
    if cuda_graphs:
        if x0.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs the sample on a CUDA device, got {x0.device}")
        net = _graphed(net)

    def func(t: Tensor, x: Tensor) -> Tensor:
        v = guided_velocity(net, x, t, cond, uncond, cfg_scale, cfg_interval, prediction=prediction, eps=eps)
        return v.float()

    grid = time_grid(steps, alpha, device=x0.device)
    if method in FIXED_METHODS:
        # The grid doubles as the step grid, so every step lands exactly on a warped time.
        traj = odeint(func, x0, grid, method=method)
    else:
        times = grid if return_trajectory else grid[[0, -1]]
        traj = odeint(func, x0, times, method=method, rtol=rtol, atol=atol)
    return (traj[-1], traj) if return_trajectory else traj[-1]
