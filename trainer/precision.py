"""Precision from outside the model: bf16 autocast on CUDA (fp32 master weights), and Transformer Engine FP8
for the large projections when asked for and possible (models/linear.py converts the layers).

On a CPU, precision.compute=bf16 computes in fp32 unless precision.bf16_on_cpu=true: CPU autocast supports bf16
too, but whether it pays depends on the CPU's bf16 instructions, so a CPU run keeps fp32 unless asked. With the flag
a CPU runs the CUDA path (bf16 autocast over fp32 master weights, an fp32 loss): the tests run it without a GPU.

TE's shape rule, per recipe (tests/te_standin.py cites TE's source for each part). An FP8 GEMM needs the product of
its input's leading dimensions (the rows: batch x tokens) and the layer's feature sizes to be multiples of
`FP8_MULTIPLE[recipe]`: 16 for per-tensor scaling (current, delayed; TE's forward asks rows % 8, and Hopper's TN-only
FP8 GEMMs make the training backward ask rows % 16), 32 for MXFP8 (its 32-value scaling blocks, in both dimensions).
A layer's rows are batch x (rows per sample), and the batch is whatever the micro-batch, the guidance pair or a
preview makes it, so a layer is safe at every batch size only if its rows per sample are a multiple. `convert`
measures each linear's rows per sample with one forward of the model on the meta device (no memory, no compute) at
every latent size the data holds (every bucket), converts only the layers that pass and logs the ones it keeps in
bf16 for that reason. Caption keys pass because FP8 runs pad the caption sequence (model.text_pad_multiple, masked;
trainer/builders.py sets it from `text_pad_multiple`).

Delayed scaling's checkpoint state (te.Linear's `_extra_state`: its amax history and scales) is a Python pickle,
which TE >= 2.18 refuses to load unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1, and which could run code when
loaded. `loadable_extra_state` hands TE empty states in its place unless the user set that variable, and logs it:
the scales then restart from the amaxes of the next steps, as at the start of a run.
"""

import contextlib
import logging
import os
from collections import defaultdict
from collections.abc import Sequence

import torch
from omegaconf import DictConfig
from torch import nn

from models.linear import KEEP_HIGH_PRECISION, convert_linears, fp8_filter, layer_kinds, linear_backend
from trainer.config import check_value

log = logging.getLogger(__name__)

FP8_MULTIPLE = {"current": 16, "delayed": 16, "mxfp8": 32}
"""Rows (batch x tokens) and feature sizes of every FP8 GEMM must be multiples of this, per recipe."""
UNSAFE_PICKLE_ENV = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"


def fp8_recipe_name(name: str, device: torch.device) -> str:
    """precision.fp8_recipe with `auto` resolved for this GPU: MXFP8 block scaling on Blackwell (sm_100+), per-tensor
    current scaling on Hopper (MXFP8 needs Blackwell's tensor cores); `delayed` is TE's amax-history recipe."""
    check_value("precision.fp8_recipe", name)
    if name == "auto":
        return "mxfp8" if torch.cuda.get_device_capability(device)[0] >= 10 else "current"
    return name


def text_pad_multiple(name: str) -> int:
    """The caption padding an FP8 run of precision.fp8_recipe=`name` needs: the recipe's multiple, and for `auto`
    the largest one it may pick (the model config is fixed before the GPU is known and resumes on any)."""
    check_value("precision.fp8_recipe", name)
    return max(FP8_MULTIPLE.values()) if name == "auto" else FP8_MULTIPLE[name]


def fp8_recipe(name: str, device: torch.device):
    """The TE recipe object of precision.fp8_recipe=`name` on this GPU (fp8_recipe_name)."""
    from transformer_engine.common import recipe

    name = fp8_recipe_name(name, device)
    if name == "mxfp8":
        return recipe.MXFP8BlockScaling()
    if name == "current":
        return recipe.Float8CurrentScaling()
    return recipe.DelayedScaling()


def loadable_extra_state(extra: dict[str, dict[str, torch.Tensor]], source: str) -> dict[str, dict[str, torch.Tensor]]:
    """te.Linear `_extra_state` entries of a checkpoint ({"model": {...}, "ema": {...}}) as this run hands them to TE:
    as saved when the user opted in to TE's unpickling (its own NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1), else with
    every non-empty (pickled: delayed scaling's amax history and scales) state replaced by an empty one, which TE
    skips, and one log line. Stateless recipes (current, MXFP8) save empty states, so nothing of theirs is lost."""
    if os.environ.get(UNSAFE_PICKLE_ENV) == "1":
        return extra
    pickled = sum(bool(v.numel()) for part in extra.values() for v in part.values())
    if pickled:
        log.warning("%s: dropped the FP8 delayed-scaling state (amax history and scales) of %d te.Linear layers: TE "
                    "stores it as a Python pickle, which TE >= 2.18 refuses to load and which could run code; the "
                    "scales restart from the next steps' amaxes. To restore it from a checkpoint you trust, set %s=1.",
                    source, pickled, UNSAFE_PICKLE_ENV)
    empty = torch.empty(0, dtype=torch.uint8)
    return {key: {k: v if not v.numel() else empty for k, v in part.items()} for key, part in extra.items()}


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
        check_value("precision.compute", cfg.compute)
        self.device = device
        self.bf16 = cfg.compute == "bf16" and (device.type == "cuda" or
                                               (device.type == "cpu" and cfg.bf16_on_cpu))
        if cfg.compute == "bf16" and not self.bf16:
            log.info("precision.compute=bf16: autocast runs on CUDA (on a CPU with precision.bf16_on_cpu=true); this "
                     "%s run computes in fp32", device.type)
        self.fp8, self.recipe_name, self.recipe = bool(cfg.fp8), cfg.fp8_recipe, None
        keep = cfg.keep_high_precision
        self.keep_high_precision = tuple(KEEP_HIGH_PRECISION if keep is None else keep)
        # Only te.Linear accumulates into main_grad; with no TE layers converted this changes nothing.
        self.fuse_wgrad_accumulation = cfg.fuse_wgrad_accumulation

    def convert(self, model: nn.Module, model_config=None, sizes: Sequence[tuple[int, int]] = (),
                adapted=None) -> int:
        """Swap the large linears for te.Linear when fp8 is on and TE can run; returns how many. Only layers whose
        feature sizes are multiples of the recipe's FP8_MULTIPLE convert, and with a model config and the data's
        input sizes (every bucket's), only those whose rows per sample are too, at every size: TE's shape rule then
        holds at any batch size. `adapted`: for a model with LoRA layers, trainer/lora.py's adapter_aware, which
        wraps the filter so that it reads a wrapped layer by the name it had (the names rows_per_sample measures)
        and keeps the adapters in bf16."""
        if not self.fp8 or linear_backend("fp8", self.device) == "torch":
            return 0  # linear_backend has logged why
        name = fp8_recipe_name(self.recipe_name, self.device)
        multiple = FP8_MULTIPLE[name]
        include = fp8_filter(self.keep_high_precision, multiple)
        if model_config is not None and sizes:
            rows = rows_per_sample(model_config, sizes)
            unsafe = sorted(n for n, r in rows.items() if any(v % multiple for v in r) and include(
                n, _unwrapped(model.get_submodule(n))))
            if unsafe:
                log.info("kept in bf16 for TE's shape rule (%s: rows per sample not a multiple of %d at %s): %s",
                         name, multiple, [f"{h}x{w}" for h, w in sizes], layer_kinds(unsafe))
            include = _excluding(include, set(unsafe))
        if adapted is not None:
            include = adapted(include)
        converted = convert_linears(model, "fp8", self.device, include=include,
                                    fuse_wgrad_accumulation=self.fuse_wgrad_accumulation)
        if converted:
            self.recipe = fp8_recipe(name, self.device)
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


def _unwrapped(layer: nn.Module) -> nn.Module:
    """The linear a LoRA layer wraps (peft's `base_layer`, trainer/lora.py), or the layer itself."""
    return getattr(layer, "base_layer", layer)


def _excluding(include, names: set[str]):
    return lambda name, layer: name not in names and include(name, layer)
