"""Training throughput of mmDiT against diffusers' PixArtTransformer2DModel at the same width, depth, heads,
text length and batch: img/s, tokens/s, MFU against the GPU's dense bf16 peak, peak memory.

    python -m scripts.bench.train                              # mmDiT-XL/2 at 256 and 512 px, every mode
    python -m scripts.bench.train --sizes 256 --batch 64 --modes eager compiled diffusers
    python -m scripts.bench.train --smoke                      # tiny model, 2 steps, on a CPU: does it still run

One step = forward, rectified-flow MSE, backward, fused AdamW step, under bf16 autocast with fp32 master
weights (the trainer's precision). Modes:
  eager          our model, eager
  compiled       our model, torch.compile per block (train.compile=block)
  fp8            our model, Transformer Engine te.Linear (current scaling on Hopper, MXFP8 on Blackwell) with
                 fused wgrad into main_grad, compiled per block
  diffusers      PixArtTransformer2DModel, eager
  diffusers-compiled  the same, torch.compile per transformer block
Synthetic inputs (random latents and encoder states, full masks): the data loader is benchmarked apart
(scripts/bench/loader.py). Latents are 16 x (px/8) x (px/8), the SD3 VAE's. MFU counts our analytic FLOPs
(scripts/bench/common.py) for our modes and the same count for diffusers' (its extra caption projection,
2·L·e·d + 2·L·d·d per image, is added), over the median step time.
"""

import argparse
import sys

import torch

from core.cli_help import HelpFormatter
from core.device import default_device
from flow import Uniform
from flow.rectified_flow import RectifiedFlow
from models import build_model, model_config
from scripts.bench.common import (
    environment,
    median_seconds,
    mmdit_forward_flops,
    peak_tflops,
    pixart_forward,
    pixart_transformer,
    print_table,
    train_step_flops,
)
from trainer.fast_path import apply_compile
from trainer.main_grad import MainGrads
from trainer.optim import build_optimizer

MODES = ("eager", "compiled", "fp8", "diffusers", "diffusers-compiled")


def build(mode: str, cfg, device: torch.device):
    """(model, forward(x, t, text, mask), main_grads or None, skipped reason or None)."""
    if mode.startswith("diffusers"):
        try:
            model = pixart_transformer(cfg.dim, cfg.depth, cfg.heads, cfg.in_channels, cfg.patch, cfg.input_size,
                                       cfg.text_dim).to(device)
        except ImportError as err:
            return None, None, None, f"diffusers not importable ({err})"
        if mode == "diffusers-compiled":
            if device.type != "cuda":
                return None, None, None, "compiled modes run on CUDA only here (CPU inductor compile takes minutes)"
            for block in model.transformer_blocks:
                block.compile()
        return model, lambda x, t, text, mask: pixart_forward(model, x, t, text, mask), None, None
    model = build_model(cfg).to(device)
    grads = None
    if mode == "fp8":
        from models.linear import convert_linears, te_unavailable_reason

        reason = te_unavailable_reason(device)
        if reason is not None:
            return None, None, None, reason
        convert_linears(model, "fp8", device, fuse_wgrad_accumulation=True)
        grads = MainGrads(model)
    if mode in ("compiled", "fp8") and device.type == "cuda":
        apply_compile(model, "block")
    elif mode in ("compiled", "fp8"):
        return None, None, None, "compiled modes run on CUDA only here (CPU inductor compile takes minutes)"
    return model, model, grads, None


def fp8_context(mode: str, device: torch.device):
    import contextlib

    if mode != "fp8":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    from trainer.precision import fp8_recipe

    return te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe("auto", device))


def bench(mode: str, px: int, args, device: torch.device) -> dict:
    latent = px // 8 if not args.smoke else 16
    cfg = model_config(args.model, input_size=latent, text_len=args.text_len) if not args.smoke else model_config(
        "mmDiT-debug/4", input_size=latent)
    row = dict(mode=mode, px=px, model=cfg.name, batch=args.batch)
    model, forward, grads, skipped = build(mode, cfg, device)
    if skipped:
        return row | dict(note=f"skipped: {skipped}")
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.03, betas=(0.9, 0.999), eps=1e-15,
                          fused=device.type == "cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    b, c = args.batch, cfg.in_channels
    x1 = torch.randn(b, c, latent, latent, generator=gen, device=device)
    text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=gen, device=device)
    mask = torch.ones(b, cfg.text_len, dtype=torch.bool, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    losses = []

    objective = RectifiedFlow(Uniform())  # the trainer's objective (draws, path, loss), uniform times

    def net(x, t, text, text_mask):
        return forward(x, t, text, text_mask)

    def step():
        with autocast, fp8_context(mode, device):
            loss = objective.loss(net, x1, dict(text=text, text_mask=mask), None)
        loss.backward()
        if grads:
            grads.to_grad()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if grads:
            grads.zero()
        losses.append(loss.detach())
        return loss

    sec = median_seconds(step, args.warmup, args.steps, device)
    loss = losses[-1]
    tokens = (latent // cfg.patch) ** 2
    flops = mmdit_forward_flops(cfg.dim, cfg.depth, tokens, cfg.text_len + 1, cfg.text_dim, c, cfg.patch,
                                cfg.mlp_ratio, cfg.cond_dim)
    if mode.startswith("diffusers"):
        # No learned null token; a caption projection e -> d -> d runs on the L text tokens first, and the
        # cross-attention k/v then read d-wide (not e-wide) states.
        length = cfg.text_len
        flops += cfg.depth * (2 * length * cfg.dim * 2 * cfg.dim - 2 * (length + 1) * cfg.text_dim * 2 * cfg.dim)
        flops += 2 * length * cfg.text_dim * cfg.dim + 2 * length * cfg.dim * cfg.dim
    achieved = train_step_flops(flops, b) / sec
    peak = peak_tflops(torch.cuda.get_device_name(device), args.peak_tflops) if device.type == "cuda" else (
        args.peak_tflops)
    row |= dict(
        step_ms=sec * 1e3, img_s=b / sec, tokens_s=b * tokens / sec, tflops=achieved / 1e12,
        mfu=achieved / (peak * 1e12) if peak else None,
        mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        loss=loss.item(),
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="mmDiT-XL/2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="image sides in pixels")
    ap.add_argument("--batch", type=int, default=32, help="per-GPU batch, the same for every mode")
    ap.add_argument("--text-len", type=int, default=120)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps; the median is reported")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak when the GPU is not in the table")
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script runs (CPU is fine)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.batch, args.warmup, args.steps = [128], 2, 0, 2
    device = default_device()
    print(environment())
    rows = []
    for px in args.sizes:
        for mode in args.modes:
            rows.append(bench(mode, px, args, device))
            print(f"  {rows[-1]}", file=sys.stderr)
    for px in args.sizes:
        ours = {r["mode"]: r for r in rows if r["px"] == px and "img_s" in r}
        for r in rows:
            if r["px"] == px and "img_s" in r:
                base = ours.get("diffusers")
                r["vs_diffusers"] = r["img_s"] / base["img_s"] if base else None
    print_table(rows, ["mode", "px", "model", "batch", "step_ms", "img_s", "tokens_s", "tflops", "mfu", "mem_gb",
                       "vs_diffusers", "loss", "note"])


if __name__ == "__main__":
    main()
