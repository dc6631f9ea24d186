"""FP8 against bf16 loss parity through the real training loop: the same stage, data and seed trained twice,
`precision=bf16` and `precision=fp8` (te.Linear with fused wgrad into main_grad, trainer/main_grad.py). The FP8
run's final loss (trainer summary: mean of the last 50 steps) must be within 1% of the bf16 run's. Needs a CUDA
GPU with FP8 (sm_89+) and Transformer Engine; exits 1 when parity fails, 2 when it cannot run.

    python -m scripts.bench.fp8_parity                                  # Stage 2 embedded config, 500 steps
    python -m scripts.bench.fp8_parity --steps 500 model.overrides.dim=768 model.overrides.depth=12   # a wider model
    python -m scripts.bench.fp8_parity --smoke                          # CPU, 3 steps: both runs fall back to nn.Linear

Both runs rest on the trainer's determinism (trainer/loop.py: every draw seeded by seed, step and rank), so they
see identical batches, noise and times; positional arguments go to both runs as Hydra overrides. The data is
the embedded 32 px synthetic captions (built under --data-dir if missing).
"""

import argparse
import json
import sys
from pathlib import Path

from core.cli_help import HelpFormatter
from scripts.bench.pixel import ensure_data, run

ROOT = Path(__file__).resolve().parents[2]


def train(precision: str, args: argparse.Namespace) -> float:
    out = args.out_dir / precision
    run([sys.executable, "train_stage2.py", "experiment=embedded", f"embedded_data={args.data_dir}",
         f"precision={precision}", f"device={'cpu' if args.smoke else 'cuda'}", "train.init_from=null",
         "train.resume=never", f"train.out_dir={out}", f"train.max_steps={args.steps}", "train.eval_batches=0",
         f"train.sample_every={args.steps}", f"train.ckpt_every={args.steps}", *args.overrides])
    return float(json.loads((out / "summary.json").read_text())["final_loss"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--tolerance", type=float, default=0.01)
    ap.add_argument("--smoke", action="store_true", help="CPU, 3 steps, no TE needed: checks the script runs")
    ap.add_argument("--data-dir", type=Path, default=Path("outputs/data"))
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/fp8_parity"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs, e.g. model.overrides.dim=768")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps = 3
    else:
        from models.linear import te_unavailable_reason

        reason = te_unavailable_reason("cuda")
        if reason is not None:
            print(f"cannot run: {reason}")
            return 2
    args.data_dir, args.out_dir = (ROOT / args.data_dir).resolve(), (ROOT / args.out_dir).resolve()
    ensure_data(args.data_dir)
    bf16, fp8 = train("bf16", args), train("fp8", args)
    rel = abs(fp8 - bf16) / bf16
    print(f"bf16 {bf16:.5f}, fp8 {fp8:.5f} (final loss after {args.steps} steps, mean of the last "
          f"{min(50, args.steps)}), relative difference {rel:.2%} (tolerance {args.tolerance:.0%})")
    return 0 if rel <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
