"""Held-out accuracy against training time for one run of the embedded curriculum (the README's demo figure).

    python -m scripts.demo.progress [--runs-dir outputs/embedded] [--out figures/demo_progress.png]

Scores every checkpoint the text stages (2-5) kept (`make demo` keeps them all: train.keep_checkpoints in
configs/experiment/embedded.yaml) with `python -m evaluation.evaluate` on the 40 held-out compositions, and plots
colour, shape, position and all three against the minutes of training before that checkpoint: each stage's
wall time from its metrics.jsonl (first to last row), Stage 1 included, summed in curriculum order. Writes the
figure and a JSON of the points beside it.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("colour", "shape", "position", "overall")


def stage_times(run: Path) -> dict[int, float]:
    """{step: seconds since the stage's first metrics row} for the rows of a stage's metrics.jsonl."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = rows[0]["time"]
    return {int(r["step"]): r["time"] - start for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--runs-dir", type=Path, default=Path("outputs/embedded"), help="the stage<N>/ run folders")
    p.add_argument("--out", type=Path, default=Path("figures/demo_progress.png"))
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--points", type=Path, default=None, help="redraw from this JSON of a previous run instead")
    args = p.parse_args()

    from core import checkpoint

    offset, points, starts = 0.0, [], {}
    old = json.loads(args.points.read_text()) if args.points else None
    for stage in (1, 2, 3, 4, 5):
        run = args.runs_dir / f"stage{stage}"
        times = stage_times(run)
        starts[stage] = offset / 60
        if old is not None:
            points = old
        elif stage > 1:
            for ckpt in checkpoint.list_checkpoints(run / "checkpoints"):
                step = checkpoint.step_of(ckpt)
                out = args.out.parent / f"{args.out.stem}_points" / f"stage{stage}_{step}"
                subprocess.run([sys.executable, "-m", "evaluation.evaluate", "--model-path", str(ckpt),
                                "--samples-per-prompt", str(args.samples_per_prompt), "--json", str(out / "eval.json"),
                                "--device", "cpu"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
                accuracy = json.loads((out / "eval.json").read_text())["accuracy"]
                points.append(dict(stage=stage, step=step, minutes=(offset + times[step]) / 60,
                                   **{k: accuracy[k] for k in KEYS}))
                print(json.dumps(points[-1]), flush=True)
        offset += max(times.values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=1))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    minutes = [q["minutes"] for q in points]
    for key in KEYS:
        ax.plot(minutes, [q[key] for q in points], marker="o", label="all three" if key == "overall" else key)
    for stage in (2, 3, 4, 5):  # where each stage starts
        ax.axvline(starts[stage], color="0.8", lw=0.8)
        ax.text(starts[stage] + 0.05, 0.97, f"S{stage}", fontsize=8, va="top", transform=ax.get_xaxis_transform())
    ax.axhline(0.25, color="0.6", ls=":", lw=0.8)
    ax.set(xlabel="training minutes (Stage 1 included)", ylabel="held-out accuracy", ylim=(0, 1.05), xlim=(0, None),
           title="embedded curriculum: held-out compositions (shape chance 0.25)")
    ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
