"""What one evaluation of a transformer costs, for the request budget (app/validation.py: check_budget).

The floating-point operations of one forward on one image at a given size, counted by torch's FlopCounterMode (the
matmuls, convolutions and attention kernels, from their shapes) while a copy of the model built on the meta device
runs: a meta tensor has a shape and no storage, so the count allocates nothing and computes nothing, at any size.
Counting the model itself, rather than a formula of its config, covers every family and every size alike: the
projections and MLPs grow with the tokens, attention with their square, cross- and joint attention with the caption.
"""

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


class EvaluationCost:
    """FLOPs of one evaluation on one image, by (height, width) in the model's input pixels (latent pixels for a
    latent model), counted once per size. `build()` makes the model (called under the meta device); `run(model,
    height, width)` makes one forward of it on meta inputs of that size."""

    def __init__(self, build: Callable[[], torch.nn.Module], run: Callable[[torch.nn.Module, int, int], object],
                 keep: int = 64):
        self._build, self._run, self._keep = build, run, keep
        self._model: torch.nn.Module | None = None
        self._known: dict[tuple[int, int], int] = {}

    def __call__(self, height: int, width: int) -> int:
        size = (int(height), int(width))
        if size not in self._known:
            if self._model is None:
                with torch.device("meta"):
                    self._model = self._build()
            if len(self._known) >= self._keep:  # bounded: the app may be asked for many sizes
                self._known.clear()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                self._run(self._model, *size)
            self._known[size] = int(counter.get_total_flops())
        return self._known[size]
