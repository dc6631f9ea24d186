"""FP8 against bf16 loss parity: the same model, data and seed trained twice; the FP8 run's final loss (mean of
the last 50 steps) must be within 1% of the bf16 run's. Needs a CUDA GPU with FP8 (sm_89+) and Transformer
Engine; exits 1 when parity fails, 2 when it cannot run.

    python scripts/fp8_parity.py [--model mmDiT-B/2] [--steps 500] [--batch 32] [--px 256]

The data is a fixed pool of synthetic latents (smooth random fields, so there is structure to fit) with
random encoder states, drawn from one seed; noise and times come from a generator seeded per step, so both
runs see identical batches. FP8 runs te.Linear with fused wgrad into main_grad (trainer/main_grad.py).
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from models import build_model, model_config  # noqa: E402
from models.linear import convert_linears, te_unavailable_reason  # noqa: E402
from trainer.main_grad import MainGrads  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402
from trainer.precision import fp8_recipe  # noqa: E402


def run(fp8: bool, args) -> list[float]:
    import contextlib

    device = torch.device("cuda")
    cfg = model_config(args.model, input_size=args.px // 8)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    grads = None
    fp8_ctx = contextlib.nullcontext
    if fp8:
        import transformer_engine.pytorch as te

        convert_linears(model, "fp8", device, fuse_wgrad_accumulation=True)
        grads = MainGrads(model)
        recipe = fp8_recipe("auto", device)
        fp8_ctx = lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.03, betas=(0.9, 0.999), eps=1e-15, fused=True)
    data_gen = torch.Generator(device=device).manual_seed(1)
    pool = 256
    side = cfg.input_size
    coarse = torch.randn(pool, cfg.in_channels, side // 4, side // 4, device=device, generator=data_gen)
    x1_pool = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    text_pool = torch.randn(pool, cfg.text_len, cfg.text_dim, device=device, generator=data_gen)
    mask = torch.ones(args.batch, cfg.text_len, dtype=torch.bool, device=device)
    losses = []
    for step in range(args.steps):
        gen = torch.Generator(device=device).manual_seed(1000 + step)
        idx = torch.randint(0, pool, (args.batch,), device=device, generator=gen)
        x1, text = x1_pool[idx], text_pool[idx]
        x0 = torch.randn(x1.shape, device=device, generator=gen)
        t = torch.sigmoid(torch.randn(args.batch, device=device, generator=gen))
        tt = t[:, None, None, None]
        with torch.autocast("cuda", dtype=torch.bfloat16), fp8_ctx():
            v = model(tt * x1 + (1 - tt) * x0, t, text, mask)
        loss = (v.float() - (x1 - x0)).square().mean()
        loss.backward()
        if grads:
            grads.to_grad()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if grads:
            grads.zero()
        losses.append(loss.item())
    return losses


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mmDiT-B/2")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--tolerance", type=float, default=0.01)
    args = ap.parse_args()
    reason = te_unavailable_reason("cuda")
    if reason is not None:
        print(f"cannot run: {reason}")
        return 2
    bf16, fp8 = run(False, args), run(True, args)
    tail = min(50, args.steps)
    a, b = sum(bf16[-tail:]) / tail, sum(fp8[-tail:]) / tail
    rel = abs(b - a) / a
    print(f"{torch.cuda.get_device_name()}: bf16 {a:.5f}, fp8 {b:.5f} (mean of the last {tail} of {args.steps} "
          f"steps), relative difference {rel:.2%} (tolerance {args.tolerance:.0%})")
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
