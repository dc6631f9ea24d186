"""The embedded five-stage demo (`make demo`): the whole curriculum on a CPU in about 20 minutes.

    python -m scripts.demo [--out-dir outputs/demo] [--fresh]

1. builds the embedded synthetic scenes as shards (scripts/tools/build_embedded_data.sh): at 32 px, one huge
   centred shape per scene with its label (Stage 1: what each shape looks like) and one large shape at one of five
   places with its caption (Stages 2-3: the words); at 40 and 48 px, three aspect-ratio buckets each of the same
   one-shape scenes; every caption set with its stored MiniLM features;
2. Stage 1: class-conditional ccDiT on the shape labels (python train_stage1.py experiment=embedded), then
   scripts/demo/stage1_probe.py: how often it draws each labelled shape, printed and kept in the summary;
3. reparameterize.py stage1-to-stage2: Stage 1's EMA -> the Stage-2 mmDiT initialisation, printing parity;
4. Stages 2-5 on captions, resolution rising 32 -> 32 -> 40 -> 48 px with the patch (4, 4, 5, 6: an 8x8 token grid
   throughout, models/conversion.py:change_patch), each from the previous stage's EMA;
5. the compositional evaluation (evaluation/evaluate.py) of Stage 3 (32 px) and Stage 5 (48x48 and 42x54 px) on
   the 40 held-out colour-shape-position combinations, and a prompt grid from the final model;
6. the distribution figures of the final checkpoint (evaluation/embedded.py: Frechet distance on the scene
   encoder's features against held-out real scenes, with its real-vs-real floor, and the loss by timestep;
   --distribution-stages 1 3 5 for more);
7. writes OUT/summary.json: each stage's final checkpoint and wall time, Stage 1's probe, the held-batch losses at
   every stage boundary (the previous stage's EMA at its end, the next stage's weights at its start), the
   reparameterization's parity figures and the evaluation.

Every stage runs with train.resume=auto, so a rerun after an interruption continues where it stopped and a
rerun of a finished demo only redoes the evaluation; --fresh deletes the previous outputs first. Extra
arguments after `--` go to every stage (e.g. `-- train.log_every=50`).
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]

STAGES = (1, 2, 3, 4, 5)
PROMPTS = (  # the README grid: four held-out compositions, then four seen in training
    "a large red circle in the top left on a gray background",
    "a large green star in the bottom right on a gray background",
    "a large blue square in the top left on a gray background",
    "a large yellow triangle in the bottom left on a gray background",
    "a large blue triangle in the center on a gray background",
    "a large yellow square in the top right on a gray background",
    "a large purple star in the center on a gray background",
    "a large orange circle in the bottom right on a gray background",
)


def run(cmd: list[str], log: Path | None = None, echo: bool = True) -> str:
    """Run a step with its progress bars (stderr) on the terminal; return its stdout (also saved to `log`)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, env=os.environ | {"HYDRA_FULL_ERROR": "1"})
    if echo:
        sys.stdout.write(proc.stdout)
    if log is not None:
        log.write_text(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"demo: step failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc.stdout


def build_data(data_dir: Path, samples_32: int, samples_hi: int) -> None:
    script = str(ROOT / "scripts" / "tools" / "build_embedded_data.sh")
    # 40 and 48 px: only the aspect-ratio bucketed sets with stored features, all Stages 4-5 read (BUCKETED=only).
    for sizes, kinds, samples, bucketed in (("32", "labels text", samples_32, "0"), ("40 48", "text", samples_hi,
                                                                                     "only")):
        env = os.environ | dict(DATASETS="synthetic", SIZES=sizes, KINDS=kinds, SYNTHETIC_SAMPLES=str(samples),
                                BUCKETED=bucketed, PYTHON=sys.executable)
        print(f"\n$ DATASETS=synthetic SIZES='{sizes}' KINDS='{kinds}' BUCKETED={bucketed} {script} {data_dir}",
              flush=True)
        subprocess.run([script, str(data_dir)], cwd=ROOT, env=env, check=True)


def newest_checkpoint(run_dir: Path) -> Path:
    from core import checkpoint

    found = checkpoint.newest(run_dir)
    if found is None:
        raise SystemExit(f"demo: no checkpoint in {run_dir / 'checkpoints'}")
    return found


def parse_parity(text: str) -> dict[str, float]:
    """reparameterize.py's printed `max |...| at t=0.50: 1.2e-06` lines as {t: difference}."""
    return {m[1]: float(m[2]) for m in re.finditer(r"at t=([0-9.]+): ([0-9.e+-]+)", text)}


def prompt_grid(checkpoint_path: Path, path: Path, seeds: int = 3) -> None:
    """The final model's samples for PROMPTS: a row per prompt, `seeds` columns."""
    from app.pipeline import load_pipeline
    from core.images import save_grid

    pipe = load_pipeline(checkpoint_path, device="cpu")
    prompts = [p for p in PROMPTS for _ in range(seeds)]
    images = pipe.generate(prompts=prompts, seeds=list(range(len(prompts))))
    save_grid(images, path, cols=seeds, scale=2)
    (path.with_suffix(".txt")).write_text("\n".join(PROMPTS) + "\n")


def print_probe(probe: dict) -> None:
    per_class = probe["shape_per_class"]
    print(f"Stage 1 draws the labelled shape in {probe['shape_mean']:.0%} of {probe['samples_per_class']} samples "
          "per class: " + ", ".join(f"{k} {v:.2f}" for k, v in per_class.items()), flush=True)
    weak = [k for k, v in per_class.items() if v < 0.5]
    if weak:
        print(f"note: Stage 1 draws {weak} in under half of its samples; later stages start from a model that "
              "has not learnt those shapes (README, 'The embedded demo')", flush=True)


def curriculum_plot(runs: Path, path: Path) -> None:
    """Every stage's per-step loss on one axis, stage after stage, with the boundaries marked."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from core import checkpoint

    fig, ax = plt.subplots(figsize=(8, 3.5))
    offset = 0
    for stage in STAGES:
        history = checkpoint.load(newest_checkpoint(runs / f"stage{stage}"))["history"]
        steps = [offset + i + 1 for i, v in enumerate(history) if math.isfinite(v)]
        values = [v for v in history if math.isfinite(v)]
        window = max(1, len(values) // 20)
        smooth = torch.tensor(values).unfold(0, window, 1).mean(1).tolist() if len(values) > window else values
        line = ax.plot(steps, values, lw=0.5, alpha=0.3)[0]
        ax.plot(steps[len(steps) - len(smooth):], smooth, lw=1.5, color=line.get_color(), label=f"stage {stage}")
        offset += len(history)
        ax.axvline(offset, color="gray", lw=0.5, ls="--")
    ax.set(xlabel="optimiser step (stages in order)", ylabel="flow-matching loss (x-prediction)", yscale="log",
           title="the embedded curriculum: 32 px labels, 32 px captions, fine-tune, 40 px, 48 px")
    ax.legend(ncol=5, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    # Paths are relative to the repository root, as `make data` and the embedded configs name them (the
    # sharding pipeline records its input paths and refuses to resume under different ones).
    parser.add_argument("--out-dir", type=Path, default=Path("outputs/demo"), help="summary, grids, evaluation")
    parser.add_argument("--data-dir", type=Path, default=Path("outputs/data"), help="embedded shards")
    parser.add_argument("--runs-dir", type=Path, default=Path("outputs/embedded"), help="stage<N>/ run folders")
    parser.add_argument("--samples-32", type=int, default=8000, help="synthetic scenes at 32 px")
    parser.add_argument("--samples-hi", type=int, default=2000, help="synthetic scenes at 40 and 48 px each")
    parser.add_argument("--eval-samples", type=int, default=2, help="images per held-out prompt at 32 px (Stage 3)")
    parser.add_argument("--eval-samples-final", type=int, default=2, help="images per held-out prompt, Stage 5")
    parser.add_argument("--distribution-samples", type=int, default=64,
                        help="samples (and real scenes) for the Frechet distance")
    parser.add_argument("--distribution-stages", type=int, nargs="*", default=[5],
                        help="stages whose distribution figures the summary gets (the final one fits the 20 minutes: "
                             "at 48 px 45 s for 64 samples, 74 s for 128, on 2 idle cores)")
    parser.add_argument("--fresh", action="store_true", help="delete previous stage outputs and start over")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides passed to every stage (after --)")
    args = parser.parse_args()
    os.chdir(ROOT)
    runs = args.runs_dir
    if args.fresh:
        shutil.rmtree(runs, ignore_errors=True)
        shutil.rmtree(args.out_dir, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    started = time.perf_counter()
    timings: dict[str, float] = {}

    tic = time.perf_counter()
    build_data(args.data_dir, args.samples_32, args.samples_hi)
    timings["data"] = time.perf_counter() - tic

    common = ["experiment=embedded", f"embedded_data={args.data_dir}", *args.overrides]
    parity: dict[str, float] = {}
    probe: dict = {}
    for stage in STAGES:
        init = []
        if stage == 2:
            tic = time.perf_counter()
            text = run([py, "reparameterize.py", "stage1-to-stage2", "--src", str(newest_checkpoint(runs / "stage1")),
                        "--dst", str(runs / "stage2" / "init.pt"), "--text-dim", "384", "--text-len", "32",
                        "--force"],  # a rerun rewrites the init from Stage 1's (possibly longer-trained) EMA
                       args.out_dir / "reparameterize.log")
            parity = parse_parity(text)
            timings["reparameterize"] = time.perf_counter() - tic
            init = [f"train.init_from={runs / 'stage2' / 'init.pt'}"]
        elif stage > 2:
            init = [f"train.init_from={runs / f'stage{stage - 1}'}"]
        tic = time.perf_counter()
        run([py, f"train_stage{stage}.py", *common, f"train.out_dir={runs / f'stage{stage}'}", *init])
        timings[f"stage{stage}"] = time.perf_counter() - tic
        if stage == 1:  # does Stage 1 draw every shape class before the captions start? (scripts/demo/stage1_probe.py)
            tic = time.perf_counter()
            probe_json = args.out_dir / "stage1_probe.json"
            run([py, "-m", "scripts.demo.stage1_probe", str(newest_checkpoint(runs / "stage1")), "--data",
                 str(args.data_dir / "synthetic-32" / "shards-labels"), "--json", str(probe_json)], echo=False)
            probe = json.loads(probe_json.read_text())
            print_probe(probe)
            timings["stage1_probe"] = time.perf_counter() - tic

    evaluation = {}
    # Stage 3 at its 32 px; Stage 5 at its square 48 px and at one of its non-square buckets (42x54, height first).
    non_square = ["--height", "42", "--width", "54"]
    for name, stage, samples, size in (("stage3", 3, args.eval_samples, []),
                                       ("stage5", 5, args.eval_samples_final, []),
                                       ("stage5_42x54", 5, args.eval_samples_final, non_square)):
        tic = time.perf_counter()
        out = args.out_dir / f"eval_{name}"
        run([py, "-m", "evaluation.evaluate", "--model-path", str(newest_checkpoint(runs / f"stage{stage}")),
             "--samples-per-prompt", str(samples), *size, "--out-dir", str(out), "--json", str(out / "eval.json"),
             "--device", "cpu"], echo=False)
        report = json.loads((out / "eval.json").read_text())
        evaluation[name] = {k: report[k] for k in ("accuracy", "settings") if k in report}
        evaluation[name]["grid"] = str(out / "grid.png")
        timings[f"eval_{name}"] = time.perf_counter() - tic

    # The distribution figures of evaluation/embedded.py: the Frechet distance of the scene encoder's features
    # against held-out real scenes (with the real-vs-real floor at the same n) and the loss by timestep.
    distribution = {}
    for stage in args.distribution_stages:
        tic = time.perf_counter()
        out = args.out_dir / f"distribution_stage{stage}.json"
        run([py, "-m", "evaluation.embedded", "--model-path", str(newest_checkpoint(runs / f"stage{stage}")),
             "--num-samples", str(args.distribution_samples), "--json", str(out), "--device", "cpu"], echo=False)
        distribution[f"stage{stage}"] = json.loads(out.read_text())
        timings[f"distribution_stage{stage}"] = time.perf_counter() - tic

    tic = time.perf_counter()
    grid = args.out_dir / "prompts_grid.png"
    prompt_grid(newest_checkpoint(runs / "stage5"), grid)
    timings["prompt_grid"] = time.perf_counter() - tic

    curriculum_plot(runs, args.out_dir / "losses.png")
    stages = {}
    for stage in STAGES:
        s = json.loads((runs / f"stage{stage}" / "summary.json").read_text())
        stages[f"stage{stage}"] = dict(
            checkpoint=str(newest_checkpoint(runs / f"stage{stage}")), model=s.get("model"),
            parameters=s.get("parameters"),
            steps=s.get("steps"), held_loss_start=s.get("held_loss_start"),
            held_loss_end_ema=s.get("held_loss_end_ema"), held_loss_end_raw=s.get("held_loss_end_raw"),
            held_loss_end_ema_unconditional=s.get("held_loss_end_ema_unconditional"),
            samples=s.get("samples"), loss_plot=s.get("loss_plot"),
        )
    boundaries = {
        # Stage 1 -> 2 compares like with like: the ccDiT with the null class (what reparameterization carries
        # over) and the new mmDiT with the captions, on the same held images, noise and times.
        f"stage{a}->stage{b}": dict(
            before=stages[f"stage{a}"]["held_loss_end_ema_unconditional" if a == 1 else "held_loss_end_ema"],
            after=stages[f"stage{b}"]["held_loss_start"],
            note="ccDiT with the null class -> reparameterized mmDiT with captions, same held images" if a == 1
            else ("resolution change: other images, same compositions" if b in (4, 5) else "same held batches"),
        )
        for a, b in zip(STAGES, STAGES[1:], strict=False)
    }
    summary = dict(
        stages=stages, boundaries=boundaries, reparameterization_parity=parity, stage1_probe=probe,
        evaluation=evaluation,
        distribution=distribution,
        prompt_grid=str(grid), loss_plot=str(args.out_dir / "losses.png"),
        timings_s={k: round(v, 1) for k, v in timings.items()},
        total_s=round(time.perf_counter() - started, 1),
    )
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out_dir / 'summary.json'} ({summary['total_s'] / 60:.1f} min)")
    if probe:
        print_probe(probe)
    for name, e in evaluation.items():
        print(f"{name} held-out compositions: " + ", ".join(f"{k} {v:.2f}" for k, v in e["accuracy"].items()
                                                             if isinstance(v, float)))
    for name, d in distribution.items():
        print(f"{name} Frechet distance {d['frechet_distance']:.3f} (real vs real {d['frechet_distance_real']:.3f}), "
              f"validation loss {d['validation_loss']:.4f}")


if __name__ == "__main__":
    main()
