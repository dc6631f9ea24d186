"""DiT, MM-DiT, PixelDiT and MM-PixelDiT trained for the same CPU wall-clock time on the embedded captions.

    python -m scripts.bench.pixel                      # 4 x 7 min of training, then evaluation (~33 min)
    python -m scripts.bench.pixel --minutes 1 --samples-per-prompt 1 --models dit pixeldit   # a quick look

Every model starts from scratch on the 32 px synthetic scenes with captions (the Stage 2 embedded config:
width 128, depth 6, patch 4, batch 32, x-prediction), differing only in `model=`: the semantic stream is an
mmDiT (cross-attention, "DiT") or a JointDiT (joint attention with registers, "MM-DiT"), with or without
PixelDiT's pixel-level stream on top. Each trains until `train.max_minutes` runs out (train.max_steps is set
out of reach), so a slower model takes fewer steps: the comparison is at equal cost, which is what someone
choosing between them on a fixed budget wants. The held-batch loss (velocity-space MSE, the same for all four)
and the compositional evaluation, both with the raw weights (after a few hundred steps the EMA, decay 0.995,
still remembers the start), (evaluation/evaluate.py: 40 held-out colour/shape/position triples) are
measured afterwards, outside the budget.

Output: a markdown table on stdout, outputs/bench_pixel/results.json, figures/pixel_benchmark.png (loss and
accuracies per model) and figures/pixel_benchmark_samples.png (the same prompts from each model).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
MODELS = {  # name in the table -> the trainer's model group (configs/model/)
    "dit": ("DiT (mmDiT, cross-attention)", "mmdit"),
    "mmdit": ("MM-DiT (JointDiT, joint attention)", "jointdit"),
    "pixeldit": ("PixelDiT", "pixeldit"),
    "mmpixeldit": ("MM-PixelDiT", "mmpixeldit"),
}
PROMPTS = (
    "a large red circle in the top left on a gray background",
    "a large blue triangle in the center on a gray background",
    "a large yellow square in the top right on a gray background",
    "a large green star in the bottom left on a gray background",
)


def run(cmd: list[str]) -> str:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"HYDRA_FULL_ERROR": "1"})
    if proc.returncode:
        sys.stdout.write(proc.stdout)
        raise SystemExit(f"bench_pixel: step failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def ensure_data(data_dir: Path) -> None:
    if (data_dir / "synthetic-32" / "shards-text" / "manifest.json").exists():
        return
    env = os.environ | dict(DATASETS="synthetic", SIZES="32", KINDS="text", SYNTHETIC_SAMPLES="20000",
                            PYTHON=sys.executable)
    script = ROOT / "scripts" / "tools" / "build_embedded_data.sh"
    subprocess.run([str(script), str(data_dir)], cwd=ROOT, env=env, check=True)


def train_and_evaluate(key: str, args: argparse.Namespace) -> dict:
    label, group = MODELS[key]
    out = args.out_dir / key
    py = sys.executable
    run([py, "train_stage2.py", "experiment=embedded", f"embedded_data={args.data_dir}", f"model={group}",
         "train.init_from=null", "train.resume=never", f"train.out_dir={out}", f"train.max_minutes={args.minutes}",
         "train.max_steps=1000000", "train.sample_every=1000000", "train.ckpt_every=1000000", f"seed={args.seed}"])
    summary = json.loads((out / "summary.json").read_text())
    run([py, "-m", "evaluation.evaluate", "--model-path", summary["checkpoint"], "--samples-per-prompt",
         str(args.samples_per_prompt), "--json", str(out / "eval.json"), "--out-dir", str(out / "eval"),
         "--device", "cpu", "--weights", "raw"])
    return result_row(key, out)


def result_row(key: str, out: Path) -> dict:
    """One model's row from its run folder (summary.json, eval.json)."""
    summary = json.loads((out / "summary.json").read_text())
    report = json.loads((out / "eval.json").read_text())
    return dict(key=key, label=MODELS[key][0], name=summary["model"], parameters=summary["parameters"],
                steps=summary["steps"], held_loss=summary["held_loss_end_raw"],
                held_loss_ema=summary["held_loss_end_ema"], final_loss=summary["final_loss"],
                accuracy=report["accuracy"], no_shape_found=report["no_shape_found"], checkpoint=summary["checkpoint"])


def table(rows: list[dict], minutes: float) -> str:
    head = (f"| model | parameters | steps in {minutes:g} min | held loss | (EMA) | no shape drawn | colour | shape "
            "| position | overall |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    return head + "".join(
        f"| {r['label']} | {r['parameters'] / 1e6:.2f}M | {r['steps']} | {r['held_loss']:.4f} | "
        f"{r['held_loss_ema']:.4f} | "
        f"{r['no_shape_found']:.2f} | {r['accuracy']['colour']:.2f} | {r['accuracy']['shape']:.2f} | "
        f"{r['accuracy']['position']:.2f} | {r['accuracy']['overall']:.2f} |\n" for r in rows)


def figure(rows: list[dict], minutes: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw=dict(width_ratios=(1, 2)))
    labels = [r["label"].split(" (")[0] for r in rows]
    ax_loss.bar(labels, [r["held_loss"] for r in rows], color="tab:gray")
    ax_loss.set(ylabel="held-batch loss (raw weights)", title=f"after {minutes:g} CPU minutes each")
    ax_loss.tick_params(axis="x", rotation=20)
    keys = ("drew a shape", "colour", "shape", "position", "overall")
    x = np.arange(len(rows))
    for i, key in enumerate(keys):
        values = [1 - r["no_shape_found"] if i == 0 else r["accuracy"][key] for r in rows]
        ax_acc.bar(x + (i - 2) * 0.16, values, 0.16, label=key)
    ax_acc.set_xticks(x, labels, rotation=20)
    ax_acc.set(ylim=(0, 1), ylabel="accuracy on 40 held-out triples", title="compositional evaluation")
    ax_acc.legend(ncols=5, fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    print(f"wrote {path}")


def samples(rows: list[dict], path: Path, seeds: int = 2) -> None:
    """One row per model: PROMPTS, `seeds` seeds each, the same seeds for every model."""
    import torch

    from app.pipeline import load_pipeline
    from core.images import save_grid

    prompts = [p for p in PROMPTS for _ in range(seeds)]
    images = [load_pipeline(r["checkpoint"], "raw", device="cpu").generate(prompts=prompts,
                                                                         seeds=list(range(len(prompts))))
              for r in rows]
    save_grid(torch.cat(images), path, cols=len(prompts), scale=2)
    columns = " | ".join(f"{p} (seeds {seeds * i}..{seeds * i + seeds - 1})" for i, p in enumerate(PROMPTS))
    path.with_suffix(".txt").write_text("rows: " + ", ".join(r["label"] for r in rows) + f"\ncolumns: {columns}\n")
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--minutes", type=float, default=7.0, help="training wall-clock per model")
    p.add_argument("--samples-per-prompt", type=int, default=2, help="evaluation samples per held-out triple")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path("outputs/data"))
    p.add_argument("--out-dir", type=Path, default=Path("outputs/bench_pixel"))
    p.add_argument("--figures", type=Path, default=ROOT / "figures")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the table and figures from the runs already in --out-dir (same --minutes)")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.samples_per_prompt < 1:
        p.error("--minutes must be > 0 and --samples-per-prompt >= 1")
    args.data_dir, args.out_dir = (ROOT / args.data_dir).resolve(), (ROOT / args.out_dir).resolve()
    if args.report_only:
        rows = [result_row(key, args.out_dir / key) for key in args.models]
    else:
        ensure_data(args.data_dir)
        rows = [train_and_evaluate(key, args) for key in args.models]
    (args.out_dir / "results.json").write_text(json.dumps(dict(minutes=args.minutes, rows=rows), indent=2))
    print("\n" + table(rows, args.minutes))
    figure(rows, args.minutes, args.figures / "pixel_benchmark.png")
    samples(rows, args.figures / "pixel_benchmark_samples.png")


if __name__ == "__main__":
    main()
