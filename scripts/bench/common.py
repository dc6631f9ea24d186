"""Shared by scripts/bench/train.py and scripts/bench/sample.py: the GPU's dense bf16 peak, the analytic FLOPs
of an mmDiT step, diffusers' PixArt transformer at our width, depth and heads, and the printed table."""

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch

# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets. Matched in order
# against torch.cuda.get_device_name(), so the more specific names come first.
DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(device_name: str, override: float | None = None) -> float | None:
    """The dense bf16 peak of `device_name`, or `override` (--peak-tflops), or None when unknown."""
    if override:
        return override
    for key, tflops in DENSE_BF16_TFLOPS:
        if key in device_name:
            return tflops
    return None


def mmdit_forward_flops(
    dim: int, depth: int, tokens: int, text_tokens: int, text_dim: int, in_channels: int, patch: int,
    mlp_ratio: float = 4.0, cond_dim: int = 256,
) -> float:
    """FLOPs of one image through the mmDiT forward (models/mmdit.py), counting a multiply-add as 2.

    Per block, with N image tokens, L text keys (the caption plus the learned null token), d = dim:
      self-attention:  qkv 2·N·d·3d, scores QKᵀ 2·N·N·d, weights·V 2·N·N·d, out 2·N·d·d
      cross-attention: q 2·N·d·d, kv 2·L·e·2d (from the e-wide encoder states), scores 2·N·L·d,
                       weights·V 2·N·L·d, out 2·N·d·d
      MLP:             2·N·d·hd + 2·N·hd·d with hd = mlp_ratio·d
    Outside the blocks: patch embedding 2·N·(C·p²)·d, adaLN-single 2·(c·d + d·6d) per image, the final
    layer's modulation 2·(c·d + d·2d) and projection 2·N·d·(p²·C). Norms, SiLU, softmax and the residual
    adds are elementwise and left out, as MFU conventionally does.
    """
    n, length, d, e = tokens, text_tokens, dim, text_dim
    hidden = mlp_ratio * d
    self_attn = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d
    cross_attn = 2 * n * d * d + 2 * length * e * 2 * d + 2 * 2 * n * length * d + 2 * n * d * d
    mlp = 2 * 2 * n * d * hidden
    outside = (2 * n * in_channels * patch**2 * d + 2 * (cond_dim * d + d * 6 * d)
               + 2 * (cond_dim * d + d * 2 * d) + 2 * n * d * patch**2 * in_channels)
    return depth * (self_attn + cross_attn + mlp) + outside


def train_step_flops(forward_flops: float, batch: int) -> float:
    """Forward + backward: the backward computes two matmuls (input and weight gradient) per forward one,
    so 3x the forward. Recomputation (activation checkpointing, flash attention's backward) is not model
    work and is not counted: MFU, not hardware FLOPs utilisation."""
    return 3.0 * forward_flops * batch


def pixart_transformer(dim: int, depth: int, heads: int, in_channels: int, patch: int, sample_size: int,
                       text_dim: int):
    """diffusers' PixArtTransformer2DModel built from a config (no download) at our width, depth and heads,
    fed the same encoder width; out_channels = in_channels (no learned sigma), no resolution conditioning."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=dim // heads, in_channels=in_channels,
        out_channels=in_channels, num_layers=depth, cross_attention_dim=dim, sample_size=sample_size,
        patch_size=patch, caption_channels=text_dim, use_additional_conditions=False,
    )


def pixart_forward(model, x, t, text, mask):
    """Our calling convention onto diffusers': t in [0, 1] -> its 0..1000 timestep; boolean mask as a 0/1 tensor."""
    return model(x, encoder_hidden_states=text, timestep=t * 1000, encoder_attention_mask=mask.to(x.dtype),
                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]


def environment() -> str:
    """One line: GPU (or CPU), torch, CUDA, diffusers and Transformer Engine versions, the date."""
    parts = [torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'cpu'})",
             f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for mod in ("diffusers", "transformer_engine"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - an absent or broken optional package is just reported as absent
            parts.append(f"{mod} absent")
    parts.append(datetime.date.today().isoformat())
    return " | ".join(parts)


def print_table(rows: list[dict], columns: list[str]) -> None:
    """A markdown table: paste it into docs/PERFORMANCE.md as printed."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |")


def _fmt(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def median_seconds(run: Callable[[], torch.Tensor], warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time of `run()` over `repeats` calls after `warmup` untimed ones (compilation, autotuning).
    Each call is timed from a synchronised device to the host reading one value of its result, so queued
    kernels are inside the interval."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        run().sum().item()
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return statistics.median(times)
