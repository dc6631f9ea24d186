"""One validation for every sampling front end: `Pipeline.generate`, the CLI (app/sample.py), the Gradio app and the
exported diffusers pipeline (app/diffusers_pipeline.py).

Every check raises RequestError with one line that names the setting as the front end shows it (`Names`: `steps=`
for Python callers, `--steps` for the CLI, "Steps" in the app) and the values it takes. Numbers must be finite
and in range (`Limits`; NaN fails every comparison, so it is refused too); the guidance interval is ordered inside
[0, 1]; heights and widths are positive multiples of the model's unit; prompts are non-empty strings within a
character limit and within the tokenizer's length, refused with their token count rather than cut.

A request's cost is bounded twice. Before it runs, by the transformer's work: its floating-point operations per
evaluation at the requested size (counted by torch's FlopCounterMode on a weightless copy, app/cost.py: the
projections and MLPs grow with the tokens, attention with their square), times the evaluations a step of the
solver takes, the steps, the images, and two with guidance, within `Limits.tflop`. While it runs, by
`Limits.time_limit`: a request still running past it stops at its next model evaluation (`time_limit`), so no
request holds the app's one worker for long. A checkpoint's own sampling defaults widen the ranges (`covering`),
never past core/checkpoint.py's SAMPLING_CAPS.
"""

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from core.sampling import SAMPLING_CAPS
from flow.methods import METHODS

CPU_TFLOP = 100.0
"""Default budget on a CPU, in teraFLOP (10^12 floating-point operations) of the transformer per request: 8 images
of ccDiT-XL/2 at 256 px with 24 guided steps take 91 (counted as app/cost.py counts; mmDiT-XL/2's, with its
captions, 119)."""
GPU_TFLOP = 20_000.0
"""Default budget on a GPU: 34 images of ccDiT-XL/2 at 1024 px (4096 tokens) with 50 guided steps (582 each)."""
EVALUATIONS_PER_STEP = {"euler": 1, "midpoint": 2, "heun2": 2, "heun3": 3, "rk4": 4, "bosh3": 3,
                        "adaptive_heun": 1, "dopri5": 6, "dopri8": 13}
"""Model evaluations per step of each torchdiffeq solver: a fixed-grid solver's stages; an adaptive solver's tableau
stages after the first, which reuses the previous step's last (torchdiffeq/_impl/rk_common.py, _runge_kutta_step).
Adaptive solvers choose their own number of steps: for them the budget counts `steps`, and the time limit bounds
the rest."""
class RequestError(ValueError):
    """A sampling setting out of range; the message is one line naming the setting and what it takes."""


class RequestTimeout(RequestError):
    """A request stopped because it ran past `Limits.time_limit`."""


@dataclass(frozen=True)
class Limits:
    """The ranges a request may take. The defaults are the app's controls; `BATCH` widens them for the CLI and
    Python callers, where one call draws many images."""

    steps: tuple[int, int] = (1, 200)
    cfg_scale: tuple[float, float] = (0.0, 20.0)
    alpha: tuple[float, float] = (0.1, 10.0)
    num_images: tuple[int, int] = (1, 8)
    seed: tuple[int, int] = (0, 2**31 - 1)
    prompt_chars: int = 1000
    tflop: float | None = None
    """Budget of the transformer's work per request, in teraFLOP (module docstring); None: CPU_TFLOP or GPU_TFLOP
    by device."""
    pixel_steps: int | None = None
    """An optional further cap on height x width x steps x images (evaluation's --max-pixel-steps); None: none."""
    time_limit: float | None = None
    """Seconds a request may run before it is stopped at its next model evaluation; None: no limit."""

    def covering(self, defaults: dict[str, Any]) -> "Limits":
        """These limits widened to include a checkpoint's sampling defaults, so a stage that previewed with, say,
        250 steps still opens with its own settings; never past SAMPLING_CAPS (a default outside them, or not a
        number, widens nothing: core/checkpoint.py refuses such a checkpoint when it is read)."""
        wide = {}
        for key in ("steps", "cfg_scale", "alpha"):
            lo, hi = getattr(self, key)
            cap_lo, cap_hi = SAMPLING_CAPS[key]
            value = defaults.get(key)
            if not isinstance(value, bool) and isinstance(value, int | float) and cap_lo <= value <= cap_hi:
                lo, hi = min(lo, value), max(hi, value)
            wide[key] = (max(lo, cap_lo), min(hi, cap_hi))
        return replace(self, **wide)

    def budget(self, device) -> float:
        """The request budget in teraFLOP on `device`."""
        if self.tflop is not None:
            return float(self.tflop)
        import torch  # here, not at the top: the command lines import this module to build --help

        return GPU_TFLOP if torch.device(device).type == "cuda" else CPU_TFLOP


BATCH = Limits(steps=(1, int(SAMPLING_CAPS["steps"][1])), num_images=(1, 4096))
"""The CLI's, the evaluation's and Pipeline.generate's limits: more steps and images per call than the app offers."""


@dataclass(frozen=True)
class Names:
    """How a front end names each setting in its messages."""

    steps: str
    cfg_scale: str
    cfg_start: str
    cfg_end: str
    alpha: str
    method: str
    seed: str
    num_images: str
    prompt: str
    label: str
    height: str
    width: str
    budget: str
    prompt_chars: str
    pixel_budget: str
    time_limit: str


PYTHON = Names(
    steps="steps=", cfg_scale="cfg_scale=", cfg_start="cfg_interval[0]", cfg_end="cfg_interval[1]", alpha="alpha=",
    method="method=", seed="seeds=", num_images="the number of images", prompt="prompts[{i}]", label="labels=",
    height="height=", width="width=", budget="limits=Limits(tflop=...)", prompt_chars="Limits.prompt_chars",
    pixel_budget="Limits.pixel_steps", time_limit="Limits.time_limit",
)
CLI = Names(
    steps="--steps", cfg_scale="--cfg-scale", cfg_start="--cfg-interval LO", cfg_end="--cfg-interval HI",
    alpha="--alpha", method="--method", seed="--seed", num_images="--num-samples x the prompts or classes",
    prompt="--prompt", label="--class-label", height="--height", width="--width", budget="--max-tflop",
    prompt_chars="--max-prompt-chars", pixel_budget="--max-pixel-steps", time_limit="--time-limit",
)
APP = Names(
    steps="Steps", cfg_scale="Guidance scale", cfg_start="Guidance from t", cfg_end="Guidance until t",
    alpha="Alpha", method="Solver", seed="Seed", num_images="Number of images", prompt="The prompt", label="Class",
    height="Height", width="Width", budget="the app's --max-tflop", prompt_chars="the app's --max-prompt-chars",
    pixel_budget="Limits.pixel_steps", time_limit="the app's --time-limit",
)
DIFFUSERS = Names(
    steps="num_inference_steps=", cfg_scale="guidance_scale=", cfg_start="cfg_interval[0]",
    cfg_end="cfg_interval[1]", alpha="the scheduler's shift (model_index.json defaults.alpha)", method="method",
    seed="generator=", num_images="the number of images", prompt="prompt[{i}]", label="class_labels=",
    height="height=", width="width=", budget="pipe.limits = Limits(tflop=...)",
    prompt_chars="pipe.limits = Limits(prompt_chars=...)", pixel_budget="pipe.limits = Limits(pixel_steps=...)",
    time_limit="pipe.limits = Limits(time_limit=...)",
)


def check_number(name: str, value: Any, bounds: tuple[float, float], integer: bool = False) -> float | int:
    """`value` as a number within `bounds` (finite, since the bounds are); RequestError names `name` and the range."""
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{name} must be a number, got {value!r}")
    if integer and not (math.isfinite(value) and value == int(value)):
        raise RequestError(f"{name} must be a whole number, got {value}")
    if not lo <= value <= hi:  # also refuses NaN
        raise RequestError(f"{name} must be between {lo} and {hi}, got {value}")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class SamplingSettings:
    """A request's sampling settings, checked."""

    steps: int
    cfg_scale: float
    cfg_interval: tuple[float, float]
    alpha: float
    method: str


def check_settings(names: Names, limits: Limits, steps: Any, cfg_scale: Any, cfg_interval: Sequence[Any],
                   alpha: Any, method: Any) -> SamplingSettings:
    """Steps, guidance scale, the guidance interval (ordered, within [0, 1]), alpha and the solver, checked."""
    if isinstance(cfg_interval, str) or not isinstance(cfg_interval, Sequence) or len(cfg_interval) != 2:
        raise RequestError(f"{names.cfg_start} and {names.cfg_end}: the guidance interval is two numbers, got "
                           f"{cfg_interval!r}")
    lo = check_number(names.cfg_start, cfg_interval[0], (0.0, 1.0))
    hi = check_number(names.cfg_end, cfg_interval[1], (0.0, 1.0))
    if lo > hi:
        raise RequestError(f"{names.cfg_start} ({lo}) must not be after {names.cfg_end} ({hi})")
    if method not in METHODS:
        raise RequestError(f"{names.method} must be one of {', '.join(METHODS)}, got {method!r}")
    return SamplingSettings(
        steps=check_number(names.steps, steps, limits.steps, integer=True),
        cfg_scale=check_number(names.cfg_scale, cfg_scale, limits.cfg_scale),
        cfg_interval=(lo, hi),
        alpha=check_number(names.alpha, alpha, limits.alpha),
        method=method,
    )


def check_seeds(name: str, seeds: Sequence[Any], limits: Limits) -> list[int]:
    """Whole numbers within `limits.seed`."""
    bad = [s for s in seeds if isinstance(s, bool) or not isinstance(s, int)]
    if bad:
        raise RequestError(f"{name}: seeds are whole numbers, got {_short(repr(bad))}")
    lo, hi = limits.seed
    if seeds and not lo <= min(seeds) <= max(seeds) <= hi:
        raise RequestError(f"{name}: the seeds run from {min(seeds)} to {max(seeds)}; they must lie within {lo}..{hi}")
    return [int(s) for s in seeds]


def check_prompt(name: str, prompt: Any, limits: Limits, count_tokens: Callable[[str], int] | None = None,
                 max_tokens: int | None = None, chars_name: str = "") -> str:
    """A non-empty string within `limits.prompt_chars` characters and, when `count_tokens` is given, within
    `max_tokens` tokens (the text encoder reads no further: a longer prompt is refused with its count, never cut).
    Returned stripped."""
    if not isinstance(prompt, str):
        raise RequestError(f"{name} must be a string, got {type(prompt).__name__} {_short(repr(prompt))}")
    text = prompt.strip()
    if not text:
        raise RequestError(f"{name} is empty: describe the image to generate")
    if len(text) > limits.prompt_chars:
        more = f" ({chars_name} raises it)" if chars_name else ""
        raise RequestError(f"{name} is {len(text)} characters long; at most {limits.prompt_chars}{more}")
    if count_tokens is not None and max_tokens is not None:
        tokens = count_tokens(text)
        if tokens > max_tokens:
            raise RequestError(f"{name} is {tokens} tokens long, but this checkpoint's text encoder reads only the "
                               f"first {max_tokens}: shorten it")
    return text


def check_labels(name: str, labels: Sequence[Any], null_label: int) -> list[int]:
    """Class indices in 0..null_label (the last is the null class): models/embeddings.py's one check, as a
    RequestError naming `name`."""
    from models.embeddings import check_labels as check

    try:
        return check(labels, null_label, name)  # num_classes = null_label: the null class is the row after them
    except ValueError as err:
        raise RequestError(str(err)) from None


def check_count(name: str, count: int, limits: Limits) -> int:
    """The number of images one request draws, within `limits.num_images`."""
    lo, hi = limits.num_images
    if not lo <= count <= hi:
        raise RequestError(f"{name}: {count} images in one request; {lo} to {hi} are allowed")
    return count


def check_size(names: Names, height: Any, width: Any, unit: int, default: int, detail: str) -> tuple[int, int]:
    """(height, width) in pixels: None is `default`, anything else a positive multiple of `unit` (`detail` says
    where the unit comes from)."""
    sizes = []
    for name, value in ((names.height, height), (names.width, width)):
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % unit:
            raise RequestError(f"{name} {value}: this model takes multiples of {unit} pixels ({detail}), "
                               f"from {unit} up")
        sizes.append(value)
    return sizes[0], sizes[1]


def check_budget(names: Names, limits: Limits, device, height: int, width: int, steps: int, images: int,
                 method: str, guided: bool, forward_flops: int) -> float:
    """The request's teraFLOP (module docstring) within `limits.budget(device)`, and its pixels x steps x images
    within `limits.pixel_steps` when that is set; returns the teraFLOP. `forward_flops`: one evaluation of the
    transformer on one image of height x width (app/cost.py)."""
    what = f"{height}x{width} pixels x {steps} {{}}step{'s' * (steps != 1)} x {images} image{'s' * (images != 1)}"
    pixel_steps = height * width * steps * images
    if limits.pixel_steps is not None and pixel_steps > limits.pixel_steps:
        raise RequestError(
            f"{what.format('')} = {pixel_steps:,} pixel-steps, over the cap of {limits.pixel_steps:,}: draw fewer or "
            f"smaller images, or fewer steps ({names.pixel_budget} raises it)"
        )
    evaluations = EVALUATIONS_PER_STEP.get(method, 1) * (2 if guided else 1)
    tflop = forward_flops * evaluations * steps * images / 1e12
    budget = limits.budget(device)
    if not tflop <= budget:
        raise RequestError(
            f"{what.format(method + ' ')}{' with guidance' if guided else ''} = {tflop:,.1f} TFLOP of the transformer "
            f"({forward_flops / 1e9:,.2f} GFLOP an evaluation), over the budget of {budget:,g} TFLOP: draw fewer or "
            f"smaller images, or fewer steps ({names.budget} raises it)"
        )
    return tflop


@contextlib.contextmanager
def time_limit(model: Any, seconds: float | None, name: str) -> Iterator[None]:
    """Stop the block's sampling once it has run `seconds` (None: never): a forward pre-hook on `model` raises
    RequestTimeout at the first evaluation past the limit. A thread cannot be stopped from outside, so the sampler
    is stopped from inside, at most one evaluation late; the budget bounds what one evaluation costs. On a GPU the
    hook first waits for the work already queued: the host would otherwise queue every step before the clock saw
    any of them run (only guidance's interval test reads a value back each step)."""
    if seconds is None or not hasattr(model, "register_forward_pre_hook"):
        yield
        return
    start = time.monotonic()

    def check(module, args):
        first = args[0] if args else None
        if getattr(first, "is_cuda", False):
            import torch

            torch.cuda.current_stream(first.device).synchronize()
        elapsed = time.monotonic() - start
        if elapsed > seconds:
            raise RequestTimeout(f"stopped after {elapsed:.1f} s, past the time limit of {seconds:g} s ({name}): "
                                 "draw fewer or smaller images, or fewer steps")

    handle = model.register_forward_pre_hook(check)
    try:
        yield
    finally:
        handle.remove()


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
