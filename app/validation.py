"""One validation for every sampling front end: `Pipeline.generate`, the CLI (app/sample.py) and the Gradio app.

Every check raises RequestError with one line that names the setting as the front end shows it (`Names`: `steps=`
for Python callers, `--steps` for the CLI, "Steps" in the app) and the values it takes. Numbers must be finite
and in range (`Limits`; NaN fails every comparison, so it is refused too); the guidance interval is ordered inside
[0, 1]; heights and widths are positive multiples of the model's unit; prompts are non-empty strings within a
character limit and within the tokenizer's length, refused with their token count rather than cut; and a request's
cost, pixels x steps x images, stays within a budget (`Limits.pixel_steps`, raised by --max-pixel-steps).
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from flow.methods import METHODS

CPU_PIXEL_STEPS = 16_000_000
"""Default budget on a CPU: 8 images of 256 x 256 at 24 steps fit; one 4096 x 4096 step does not."""
GPU_PIXEL_STEPS = 2_000_000_000
"""Default budget on a GPU, which runs the same model roughly a hundred times faster: 38 images of 1024 x 1024
at 50 steps."""


class RequestError(ValueError):
    """A sampling setting out of range; the message is one line naming the setting and what it takes."""


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
    pixel_steps: int | None = None
    """Budget of pixels x steps x images per request; None: CPU_PIXEL_STEPS or GPU_PIXEL_STEPS by device.
    (Guidance doubles the work of a step and adaptive solvers take more than `steps` evaluations: the budget is a
    bound on the request's size, not a time estimate.)"""

    def covering(self, defaults: dict[str, Any]) -> "Limits":
        """These limits widened to include a checkpoint's sampling defaults, so a stage that previewed with, say,
        250 steps still opens with its own settings."""
        steps, cfg, alpha = int(defaults["steps"]), float(defaults["cfg_scale"]), float(defaults["alpha"])
        return replace(
            self,
            steps=(self.steps[0], max(self.steps[1], steps)),
            cfg_scale=(self.cfg_scale[0], max(self.cfg_scale[1], cfg)),
            alpha=(min(self.alpha[0], alpha), max(self.alpha[1], alpha)),
        )

    def budget(self, device) -> int:
        if self.pixel_steps is not None:
            return int(self.pixel_steps)
        import torch  # here, not at the top: the command lines import this module to build --help

        return GPU_PIXEL_STEPS if torch.device(device).type == "cuda" else CPU_PIXEL_STEPS


BATCH = Limits(steps=(1, 1000), num_images=(1, 4096))
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


PYTHON = Names(
    steps="steps=", cfg_scale="cfg_scale=", cfg_start="cfg_interval[0]", cfg_end="cfg_interval[1]", alpha="alpha=",
    method="method=", seed="seeds=", num_images="the number of images", prompt="prompts[{i}]", label="labels=",
    height="height=", width="width=", budget="Limits.pixel_steps", prompt_chars="Limits.prompt_chars",
)
CLI = Names(
    steps="--steps", cfg_scale="--cfg-scale", cfg_start="--cfg-interval LO", cfg_end="--cfg-interval HI",
    alpha="--alpha", method="--method", seed="--seed", num_images="--num-samples x the prompts or classes",
    prompt="--prompt", label="--class-label", height="--height", width="--width", budget="--max-pixel-steps",
    prompt_chars="--max-prompt-chars",
)
APP = Names(
    steps="Steps", cfg_scale="Guidance scale", cfg_start="Guidance from t", cfg_end="Guidance until t",
    alpha="Alpha", method="Solver", seed="Seed", num_images="Number of images", prompt="The prompt", label="Class",
    height="Height", width="Width", budget="the app's --max-pixel-steps", prompt_chars="the app's --max-prompt-chars",
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


def check_budget(names: Names, budget: int, height: int, width: int, steps: int, images: int) -> None:
    """pixels x steps x images within `budget`."""
    cost = height * width * steps * images
    if cost > budget:
        raise RequestError(
            f"{height}x{width} pixels x {steps} steps x {images} image{'s' * (images != 1)} = {cost:,} pixel-steps, "
            f"over the budget of {budget:,}: draw fewer or smaller images, or fewer steps ({names.budget} raises it)"
        )


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
