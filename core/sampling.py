"""The sampling defaults a checkpoint records and the caps every tool holds them, and every request, to.

A checkpoint's `metadata.sampling` holds its stage's preview settings (steps, cfg_scale, alpha), which the samplers
start from; the exported diffusers pipeline keeps them in model_index.json (`defaults`). Both are files anyone can
edit, so they are checked where they are read (`sampling_problem`). Importable without torch: the command lines
read it to build --help.
"""

from typing import Any

SAMPLING_CAPS: dict[str, tuple[float, float]] = {"steps": (1, 1000), "cfg_scale": (0.0, 100.0), "alpha": (0.01, 100.0)}
"""The widest sampling settings any tool takes: recorded defaults must lie within them (the trainer checks its
preview settings against them), and no front end widens its limits past them (app/validation.py)."""


def sampling_problem(sampling: Any, key: str) -> str | None:
    """What is wrong with `sampling` as recorded defaults, naming `key` and the entry; None when nothing is. It may
    hold only steps (a whole number), cfg_scale and alpha (numbers), each within SAMPLING_CAPS; NaN fails the
    range comparison. None (recorded by no current writer) holds nothing."""
    if sampling is None:
        return None
    if not isinstance(sampling, dict):
        return f"{key} must map {', '.join(SAMPLING_CAPS)} to numbers, got {_short(repr(sampling))}"
    for name, value in sampling.items():
        if name not in SAMPLING_CAPS:
            return f"{key}.{_short(str(name))} is not a sampling setting ({', '.join(SAMPLING_CAPS)})"
        lo, hi = SAMPLING_CAPS[name]
        whole = name == "steps"
        if isinstance(value, bool) or not isinstance(value, int if whole else int | float) or not lo <= value <= hi:
            return (f"{key}.{name} is {_short(repr(value))}; it must be a {'whole number' if whole else 'number'} "
                    f"in {lo:g}..{hi:g}")
    return None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
