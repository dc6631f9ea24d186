"""Sampling throughput: images/s of 20-step Euler with classifier-free guidance, our sampler and model against
a plain loop over diffusers' PixArtTransformer2DModel at the same width, depth, heads and text length.

    python -m scripts.bench.sample                       # mmDiT-XL/2, 256 and 512 px, batch 8, guidance 4.5
    python -m scripts.bench.sample --smoke               # tiny model, 2 steps, on a CPU: does it still run

Ours is timed on the path the CLI, the app and the evaluation take: the weights in app/precision.py's dtype
(bf16 on CUDA, float32 with --fp32 or on a CPU) and app/pipeline.py's run_sampler, the call Pipeline.generate
makes (fp32 ODE state). Diffusers' transformer runs in the same dtype. Both batch the conditional and
unconditional halves into one forward per step (2 x batch). The VAE decode and the text encoder are not timed
(they are the same for both and not the transformer's cost). Modes: ours (eager), ours-graphs (cuda_graphs=True:
torch.compile reduce-overhead), diffusers (our Euler loop over its transformer, eager).
Random weights and encoder states: throughput does not depend on what the model learnt.
"""

import argparse

import torch

from app.pipeline import run_sampler
from app.precision import add_fp32_flag, inference_dtype
from core.cli_help import HelpFormatter
from core.device import default_device
from flow import time_grid
from models import build_model, model_config
from scripts.bench.common import (
    environment,
    median_seconds,
    pixart_forward,
    pixart_transformer,
    print_table,
)

MODES = ("ours", "ours-graphs", "diffusers")


@torch.no_grad()
def diffusers_loop(model, x0, text, null_text, mask, steps: int, cfg_scale: float) -> torch.Tensor:
    """The same 20-step Euler with guidance as flow.sample, written as the loop a diffusers user would write."""
    x = x0.float()
    grid = time_grid(steps, device=x.device)
    text2, mask2 = torch.cat([text, null_text]), torch.cat([mask, torch.zeros_like(mask)])
    mask2[:, 0] = True  # diffusers has no learned null token: keep one key so no attention row is empty
    for t0, t1 in zip(grid[:-1], grid[1:], strict=True):
        x2 = torch.cat([x, x]).to(text.dtype)  # the model dtype; the ODE state stays fp32
        v_c, v_u = pixart_forward(model, x2, t0.expand(x2.shape[0]), text2, mask2).float().chunk(2)
        x = x + (t1 - t0) * (v_u + cfg_scale * (v_c - v_u))
    return x


def bench(mode: str, px: int, args, device: torch.device) -> dict:
    latent = 16 if args.smoke else px // 8
    cfg = model_config("mmDiT-debug/4", input_size=latent) if args.smoke else model_config(
        args.model, input_size=latent, text_len=args.text_len)
    row = dict(mode=mode, px=px, model=cfg.name, batch=args.batch, steps=args.steps, cfg_scale=args.cfg_scale,
               dtype=str(inference_dtype(device, args.fp32)).removeprefix("torch."))
    if mode == "ours-graphs" and device.type != "cuda":
        return row | dict(note="skipped: CUDA graphs need a CUDA device")
    dtype = inference_dtype(device, args.fp32)
    b = args.batch
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(b, cfg.in_channels, latent, latent, generator=gen, device=device)
    text = torch.randn(b, cfg.text_len, cfg.text_dim, generator=gen, device=device, dtype=dtype)
    mask = torch.ones(b, cfg.text_len, dtype=torch.bool, device=device)
    if mode == "diffusers":
        try:
            model = pixart_transformer(cfg.dim, cfg.depth, cfg.heads, cfg.in_channels, cfg.patch, latent,
                                       cfg.text_dim).to(device, dtype).eval()
        except ImportError as err:
            return row | dict(note=f"skipped: diffusers not importable ({err})")
        run = lambda: diffusers_loop(model, x0, text, torch.zeros_like(text), mask, args.steps, args.cfg_scale)
    else:
        model = build_model(cfg).to(device, dtype).eval()
        cond = dict(text=text, text_mask=mask)
        uncond = dict(text=torch.zeros_like(text[:1]), text_mask=torch.zeros_like(mask[:1]))
        run = lambda: run_sampler(model, x0, cond, uncond, steps=args.steps, cfg_scale=args.cfg_scale,
                                  cuda_graphs=mode == "ours-graphs")
    sec = median_seconds(run, args.warmup, args.repeats, device)
    return row | dict(batch_s=sec, img_s=b / sec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--model", default="mmDiT-XL/2")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg-scale", type=float, default=4.5)
    ap.add_argument("--text-len", type=int, default=120)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--warmup", type=int, default=2, help="untimed batches (compilation and graph capture)")
    ap.add_argument("--repeats", type=int, default=5, help="timed batches; the median is reported")
    add_fp32_flag(ap)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps: checks the script runs (CPU is fine)")
    args = ap.parse_args()
    if args.smoke:
        args.sizes, args.batch, args.steps, args.warmup, args.repeats = [128], 2, 2, 0, 1
    device = default_device()
    print(environment())
    rows = [bench(mode, px, args, device) for px in args.sizes for mode in args.modes]
    for r in rows:
        base = next((d for d in rows if d["px"] == r["px"] and d["mode"] == "diffusers" and "img_s" in d), None)
        r["vs_diffusers"] = r["img_s"] / base["img_s"] if base and "img_s" in r else None
    print_table(rows, ["mode", "px", "model", "dtype", "batch", "steps", "cfg_scale", "batch_s", "img_s",
                       "vs_diffusers", "note"])


if __name__ == "__main__":
    main()
