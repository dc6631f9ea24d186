"""Sample images from a training checkpoint; model, resolution and classes come from its metadata.

    python app/sample.py --model-path outputs/embedded/stage1/checkpoints/step_00001200.pt \
        --class-label 0 --class-label 3 --num-samples 4 --seed 0 --out-dir outputs/samples

Writes one PNG per sample (class_<label>_seed_<seed>_<i>.png) and grid.png (a row per class).
Text prompts arrive with the text stages.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flow import sample  # noqa: E402
from flow.sampler import ADAPTIVE_METHODS, FIXED_METHODS  # noqa: E402
from trainer.checkpoint import load_model  # noqa: E402
from trainer.images import save_grid, to_uint8  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, required=True, help="checkpoint written by the trainer")
    p.add_argument("--class-label", type=int, action="append", help="class index (repeatable; default: all)")
    p.add_argument("--num-samples", type=int, default=4, help="samples per class")
    p.add_argument("--steps", type=int, default=24, help="ODE steps")
    p.add_argument("--cfg-scale", type=float, default=3.0, help="classifier-free guidance scale (1: off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), help="guide only for t in [lo, hi]")
    p.add_argument("--alpha", type=float, default=1.0, help="time-grid warp; > 1 spends more steps near noise")
    p.add_argument("--method", default="euler", choices=FIXED_METHODS + ADAPTIVE_METHODS, help="torchdiffeq solver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--size", type=int, default=None, help="image side (default: the checkpoint's)")
    p.add_argument("--out-dir", type=Path, required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, meta = load_model(args.model_path, args.weights)
    cfg = model.config
    if cfg.family != "ccdit":
        raise SystemExit(f"{args.model_path}: a {cfg.family} checkpoint; this sampler handles class-conditional ones")
    labels = args.class_label if args.class_label is not None else list(range(cfg.num_classes))
    bad = [c for c in labels if not 0 <= c <= cfg.num_classes]
    if bad:
        raise SystemExit(f"--class-label {bad} out of range 0..{cfg.num_classes} ({cfg.num_classes} = null class)")
    size = args.size or cfg.input_size
    y = torch.tensor(labels).repeat_interleave(args.num_samples)
    gen = torch.Generator().manual_seed(args.seed)
    x0 = torch.randn(len(y), cfg.in_channels, size, size, generator=gen)
    images = sample(
        model,
        x0,
        dict(labels=y),
        dict(labels=torch.full_like(y, model.null_label)),
        steps=args.steps,
        alpha=args.alpha,
        cfg_scale=args.cfg_scale,
        cfg_interval=tuple(args.cfg_interval),
        method=args.method,
        prediction=meta.get("prediction", "velocity"),
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    from PIL import Image

    for i, (img, label) in enumerate(zip(to_uint8(images), y.tolist(), strict=True)):
        name = f"class_{label}_seed_{args.seed}_{i % args.num_samples}.png"
        Image.fromarray(img.numpy()).save(args.out_dir / name)
    save_grid(images, args.out_dir / "grid.png", cols=args.num_samples, scale=4)
    names = meta.get("class_names") or []
    described = [names[c] if c < len(names) else "null" for c in labels]
    print(f"wrote {len(y)} samples of {described} and grid.png to {args.out_dir}")


if __name__ == "__main__":
    main()
