"""Precision from outside the model: bf16 autocast on CUDA (fp32 master weights), and Transformer Engine FP8
for the large projections when asked for and possible (models/linear.py converts the layers).

On a CPU, precision.compute=bf16 computes in fp32 unless precision.bf16_on_cpu=true: CPU autocast supports bf16
too, but whether it pays depends on the CPU's bf16 instructions, so a CPU run keeps fp32 unless asked. With the flag
a CPU runs the CUDA path (bf16 autocast over fp32 master weights, an fp32 loss): the tests run it without a GPU.

TE's shape rule. An FP8 GEMM needs the product of its input's leading dimensions (the rows: batch x tokens) to be
divisible by 16 (8 for some recipes; 16 covers all). A layer's rows are batch x (rows per sample), and the batch
is whatever the micro-batch, the guidance pair or a preview makes it, so a layer is safe at every batch size only
if its rows per sample are a multiple of 16. `convert` measures each linear's rows per sample with one forward of
the model on the meta device (no memory, no compute) at every latent size the data holds, converts only the
layers that pass and logs the ones it keeps in bf16 for that reason. Caption keys pass because FP8 runs pad the
caption sequence to a multiple of 16 (model.text_pad_multiple, masked; trainer/builders.py sets it).
"""

import contextlib
import logging
from collections import defaultdict
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from models.linear import KEEP_HIGH_PRECISION, convert_linears, fp8_filter, layer_kinds

log = logging.getLogger(__name__)

TE_ROW_MULTIPLE = 16


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


def fp8_context(recipe) -> contextlib.AbstractContextManager:
    import transformer_engine.pytorch as te

    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def example_inputs(model_config, height: int, width: int, device="meta") -> dict[str, torch.Tensor]:
    """One sample's inputs of a model at a height x width input (latent pixels)."""
    c = model_config
    inputs = dict(x=torch.zeros(1, c.in_channels, height, width, device=device), t=torch.full((1,), 0.5, device=device))
    if c.conditioning == "class":
        inputs["labels"] = torch.zeros(1, dtype=torch.long, device=device)
    else:
        inputs["text"] = torch.zeros(1, c.text_len, c.text_dim, device=device)
        inputs["text_mask"] = torch.ones(1, c.text_len, dtype=torch.bool, device=device)
    return inputs


def rows_per_sample(model_config, sizes: Sequence[tuple[int, int]]) -> dict[str, set[int]]:
    """For every nn.Linear of the model `model_config` describes: the rows (leading dimensions' product) it sees
    for one sample, at each (height, width) of `sizes`. Measured on the meta device."""
    from models import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    rows: dict[str, set[int]] = defaultdict(set)
    hooks = [
        module.register_forward_pre_hook(lambda m, args, name=name: rows[name].add(args[0].shape[:-1].numel()))
        for name, module in model.named_modules() if type(module) is nn.Linear
    ]
    try:
        with torch.no_grad():
            for height, width in sizes:
                model(**example_inputs(model_config, height, width))
    finally:
        for hook in hooks:
            hook.remove()
    return dict(rows)


class Precision:
    """`forward()` is the context the model's forward (and loss) runs under."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        if cfg.compute not in ("bf16", "fp32"):
            raise ValueError(f"precision.compute={cfg.compute!r}: expected bf16 or fp32")
        self.device = device
        self.bf16 = cfg.compute == "bf16" and (device.type == "cuda" or
                                               (device.type == "cpu" and bool(cfg.get("bf16_on_cpu", False))))
        if cfg.compute == "bf16" and not self.bf16:
            log.info("precision.compute=bf16: autocast runs on CUDA (on a CPU with precision.bf16_on_cpu=true); this "
                     "%s run computes in fp32", device.type)
        self.fp8, self.recipe_name, self.recipe = bool(cfg.fp8), cfg.fp8_recipe, None
        keep = cfg.get("keep_high_precision")
        self.keep_high_precision = tuple(KEEP_HIGH_PRECISION if keep is None else keep)
        # Only te.Linear accumulates into main_grad; with no TE layers converted this changes nothing.
        self.fuse_wgrad_accumulation = bool(cfg.get("fuse_wgrad_accumulation", False))

    def convert(self, model: nn.Module, model_config=None, sizes: Sequence[tuple[int, int]] = ()) -> int:
        """Swap the large linears for te.Linear when fp8 is on and TE can run; returns how many. With a model
        config and the data's input sizes, only layers that meet TE's shape rule at every batch size convert."""
        if not self.fp8:
            return 0
        include = fp8_filter(self.keep_high_precision)
        if model_config is not None and sizes:
            rows = rows_per_sample(model_config, sizes)
            unsafe = sorted(n for n, r in rows.items() if any(v % TE_ROW_MULTIPLE for v in r) and include(
                n, model.get_submodule(n)))
            if unsafe:
                log.info("kept in bf16 for TE's shape rule (rows per sample not a multiple of %d at %s): %s",
                         TE_ROW_MULTIPLE, list(sizes), layer_kinds(unsafe))
            include = _excluding(include, set(unsafe))
        converted = convert_linears(model, "fp8", self.device, include=include,
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
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        if self.recipe is not None:
            stack.enter_context(fp8_context(self.recipe))
        return stack


def _excluding(include, names: set[str]):
    return lambda name, layer: name not in names and include(name, layer)
