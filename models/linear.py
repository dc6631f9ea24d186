"""The one place that decides which linear layer a model runs: torch's nn.Linear or Transformer Engine's
te.Linear (FP8). Models always build nn.Linear; `convert_linears` swaps layers from outside, the way
torchtitan applies its float8 converter, so models know nothing of precision.

Both layers name their parameters `weight` [out, in] and `bias` [out], so state dicts move between them.
"""

import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

Backend = Literal["torch", "te"]

# Small or precision-sensitive layers stay in bf16 by default: adaLN (modulation), embeddings, the final
# projection. FP8 pays off on the large per-token matmuls. precision.keep_high_precision overrides it.
KEEP_HIGH_PRECISION = ("adaLN", "t_block", "final", "embed")


def te_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why te.Linear cannot run here, or None when it can (a CUDA device and transformer_engine)."""
    device = torch.device(device) if device is not None else None
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"FP8 needs compute capability 8.9+ (Ada, Hopper, Blackwell); this GPU is sm_{major}{minor}"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError as err:
        return f"transformer_engine is not importable ({err}); on a CUDA machine: pip install -e '.[fp8]'"
    return None


def linear_backend(precision: str, device: torch.device | str | None = None) -> Backend:
    """'te' when precision is fp8 and TE can run; else 'torch', with one log line saying why."""
    if precision != "fp8":
        return "torch"
    reason = te_unavailable_reason(device)
    if reason is not None:
        log.warning("precision=fp8 but %s: linear layers stay nn.Linear (bf16/fp32)", reason)
        return "torch"
    return "te"


def make_linear(
    in_features: int, out_features: int, bias: bool = True, backend: Backend = "torch",
    fuse_wgrad_accumulation: bool = False,
) -> nn.Module:
    """A linear layer of the chosen backend with fp32 master parameters. `fuse_wgrad_accumulation` (te only):
    the weight gradient is accumulated into `weight.main_grad` inside the wgrad GEMM (trainer/main_grad.py
    allocates the buffers and reduces them under DDP)."""
    if backend == "torch":
        if fuse_wgrad_accumulation:
            raise ValueError("fuse_wgrad_accumulation needs backend='te' (nn.Linear always writes .grad)")
        return nn.Linear(in_features, out_features, bias=bias)
    import transformer_engine.pytorch as te

    return te.Linear(in_features, out_features, bias=bias, params_dtype=torch.float32,
                     fuse_wgrad_accumulation=fuse_wgrad_accumulation)


def te_linears(model: nn.Module) -> list[str]:
    """The names of `model`'s te.Linear layers (none unless Transformer Engine has been imported, which converting
    a layer does)."""
    te = sys.modules.get("transformer_engine.pytorch")
    if te is None:
        return []
    return [name for name, module in model.named_modules() if isinstance(module, te.Linear)]


def fp8_filter(
    keep_high_precision: Sequence[str] = KEEP_HIGH_PRECISION, multiple: int = 16
) -> Callable[[str, nn.Linear], bool]:
    """Convert every linear whose name contains none of `keep_high_precision` and whose feature sizes FP8 GEMMs take:
    multiples of `multiple`, the recipe's (trainer/precision.py FP8_MULTIPLE: 16 per-tensor, 32 MXFP8)."""
    keep = tuple(keep_high_precision)

    def include(name: str, layer: nn.Linear) -> bool:
        if any(part in name for part in keep):
            return False
        return layer.in_features % multiple == 0 and layer.out_features % multiple == 0

    return include


default_fp8_filter = fp8_filter()


def layer_kinds(names: Sequence[str]) -> str:
    """'blocks.*.attn.qkv x28, final.linear x1': layer names with block indices folded, counted."""
    counts = Counter(re.sub(r"(^|\.)\d+(\.|$)", r"\1*\2", n) for n in names)
    return ", ".join(f"{kind} x{count}" for kind, count in counts.items()) or "none"


def plan_conversion(
    model: nn.Module, include: Callable[[str, nn.Linear], bool] = default_fp8_filter
) -> tuple[list[tuple[str, nn.Linear]], list[str]]:
    """(the nn.Linear layers `include` selects, the names of those it keeps)."""
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear]
    chosen = [(n, m) for n, m in linears if include(n, m)]
    picked = {n for n, _ in chosen}
    return chosen, [n for n, _ in linears if n not in picked]


def convert_linears(
    model: nn.Module,
    precision: str,
    device: torch.device | str | None = None,
    include: Callable[[str, nn.Linear], bool] = default_fp8_filter,
    fuse_wgrad_accumulation: bool = False,
) -> int:
    """Swap the nn.Linear layers selected by `include` for te.Linear in place, copying weights.

    Returns the number converted; logs one line either way, naming the kinds converted and kept.
    """
    backend = linear_backend(precision, device)
    if backend == "torch":
        return 0  # linear_backend has logged why, when fp8 was asked for
    chosen, kept = plan_conversion(model, include)
    for name, layer in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = make_linear(layer.in_features, layer.out_features, layer.bias is not None, backend,
                          fuse_wgrad_accumulation)
        new = new.to(layer.weight.device)
        with torch.no_grad():
            new.weight.copy_(layer.weight)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        setattr(parent, child, new)
    log.info("converted %d/%d linear layers to te.Linear (fp8%s): %s; kept in bf16: %s", len(chosen),
             len(chosen) + len(kept), ", fused wgrad into main_grad" if fuse_wgrad_accumulation else "",
             layer_kinds([n for n, _ in chosen]), layer_kinds(kept))
    return len(chosen)
