"""Precision from outside the model: bf16 autocast on CUDA (fp32 master weights), and Transformer Engine FP8
for the large projections when asked for and possible (models/linear.py converts the layers)."""

import contextlib
import logging

import torch
from omegaconf import DictConfig
from torch import nn

from models.linear import KEEP_HIGH_PRECISION, convert_linears, fp8_filter

log = logging.getLogger(__name__)


def fp8_recipe(name: str, device: torch.device):
    """The TE recipe for this GPU: MXFP8 block scaling on Blackwell (sm_100+), per-tensor current scaling on
    Hopper (MXFP8 needs Blackwell's tensor cores); `delayed` is TE's amax-history recipe."""
    from transformer_engine.common import recipe

    if name == "auto":
        name = "mxfp8" if torch.cuda.get_device_capability(device)[0] >= 10 else "current"
    if name == "mxfp8":
        return recipe.MXFP8BlockScaling()
    if name == "current":
        return recipe.Float8CurrentScaling()
    if name == "delayed":
        return recipe.DelayedScaling()
    raise ValueError(f"precision.fp8_recipe={name!r}: expected auto, mxfp8, current or delayed")


class Precision:
    """`forward()` is the context the model's forward (and loss) runs under."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        if cfg.compute not in ("bf16", "fp32"):
            raise ValueError(f"precision.compute={cfg.compute!r}: expected bf16 or fp32")
        self.device = device
        self.bf16 = cfg.compute == "bf16" and device.type == "cuda"
        if cfg.compute == "bf16" and not self.bf16:
            log.info("precision.compute=bf16: autocast runs on CUDA only; this %s run computes in fp32", device.type)
        self.fp8, self.recipe_name, self.recipe = bool(cfg.fp8), cfg.fp8_recipe, None
        keep = cfg.get("keep_high_precision")
        self.keep_high_precision = tuple(KEEP_HIGH_PRECISION if keep is None else keep)
        # Only te.Linear accumulates into main_grad; with no TE layers converted this changes nothing.
        self.fuse_wgrad_accumulation = bool(cfg.get("fuse_wgrad_accumulation", False))

    def convert(self, model: nn.Module) -> int:
        """Swap the large linears for te.Linear when fp8 is on and TE can run; returns how many."""
        if not self.fp8:
            return 0
        converted = convert_linears(model, "fp8", self.device, include=fp8_filter(self.keep_high_precision),
                                    fuse_wgrad_accumulation=self.fuse_wgrad_accumulation)
        if converted:
            self.recipe = fp8_recipe(self.recipe_name, self.device)
        return converted

    @property
    def model_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.bf16 else torch.float32

    def forward(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        if self.bf16:
            stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        if self.recipe is not None:
            import transformer_engine.pytorch as te

            stack.enter_context(te.fp8_autocast(enabled=True, fp8_recipe=self.recipe))
        return stack
