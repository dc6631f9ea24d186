"""Sample images from a training checkpoint; model, stage, resolution, VAE and text encoder come from its metadata.

    python app/sample.py --model-path outputs/embedded/stage5/checkpoints/step_00000150.pt \\
        --prompt "a large red circle in the top left on a gray background" --seed 0 --out-dir outputs/samples
    python app/sample.py --model-path outputs/embedded/stage1/checkpoints/step_00000800.pt \\
        --class-label 0 --class-label 3 --num-samples 4 --seed 0 --out-dir outputs/samples

Writes one PNG per sample, named by what it shows and its seed (prompt_<k>_seed_<s>.png for prompt k, or
class_<label>_seed_<s>.png), a grid.png with a row per prompt or class, and with --gif the denoising
trajectory of each sample. Sample i of prompt (or class) k has seed `--seed + k * --num-samples + i`: the same
seed gives the same pixels. Steps, guidance and alpha default to what the checkpoint's stage previewed with.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flow.sampler import ADAPTIVE_METHODS, FIXED_METHODS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", type=Path, required=True, help="checkpoint written by the trainer")
    p.add_argument("--prompt", action="append", help="text prompt (repeatable); text checkpoints")
    p.add_argument("--prompts-file", type=Path, help="one prompt per line; text checkpoints")
    p.add_argument("--class-label", type=int, action="append", help="class index (repeatable; default: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt or class")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: the checkpoint's)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale (1: off)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=(0.0, 1.0), help="guide only for t in [lo, hi]")
    p.add_argument("--alpha", type=float, default=None, help="time-grid warp; > 1 spends more steps near noise")
    p.add_argument("--method", default="euler", choices=FIXED_METHODS + ADAPTIVE_METHODS, help="torchdiffeq solver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the checkpoint's)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the checkpoint's)")
    p.add_argument("--gif", action="store_true", help="also write each sample's denoising trajectory as a GIF")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.alpha is not None and not args.alpha > 0:
        p.error(f"--alpha must be > 0, got {args.alpha}")
    return args


def read_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompt or [])
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SystemExit(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    return prompts or None


def main(argv=None) -> None:
    args = parse_args(argv)
    from PIL import Image

    from app.pipeline import CheckpointError, load_pipeline
    from trainer.images import save_uint8_grid

    try:
        pipe = load_pipeline(args.model_path, args.weights, args.device)
    except CheckpointError as err:
        raise SystemExit(str(err)) from err
    prompts = read_prompts(args)
    if pipe.is_text:
        if args.class_label:
            raise SystemExit(f"--model-path {args.model_path} is text-conditional: use --prompt, not --class-label")
        if not prompts:
            raise SystemExit("a text-conditional checkpoint needs --prompt or --prompts-file")
        items, names = prompts, [f"prompt_{k:02d}" for k in range(len(prompts))]
    else:
        if prompts:
            raise SystemExit(f"--model-path {args.model_path} is class-conditional: use --class-label, not --prompt")
        null = pipe.conditioning.null_label
        items = args.class_label if args.class_label is not None else list(range(null))
        bad = [c for c in items if not 0 <= c <= null]
        if bad:
            raise SystemExit(f"--class-label {bad} out of range 0..{null} ({null} = null class)")
        names = [f"class_{c}" for c in items]
    try:
        size = pipe.input_size_for(args.height, args.width)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    n = args.num_samples
    expanded = [item for item in items for _ in range(n)]
    seeds = [args.seed + k * n + i for k in range(len(items)) for i in range(n)]
    key = "prompts" if pipe.is_text else "labels"
    out = pipe.generate(
        **{key: expanded}, seeds=seeds, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha,
        cfg_interval=tuple(args.cfg_interval), method=args.method, size=size, return_trajectory=args.gif,
    )
    images, trajectory = out if args.gif else (out, None)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for j, image in enumerate(images):
        stem = f"{names[j // n]}_seed_{seeds[j]}"
        Image.fromarray(image.numpy()).save(args.out_dir / f"{stem}.png")
        if trajectory is not None:
            frames = [Image.fromarray(f.numpy()).resize((image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST)
                      for f in trajectory[:, j]]
            frames[0].save(args.out_dir / f"{stem}.gif", save_all=True, append_images=frames[1:], duration=100,
                           loop=0)
    save_uint8_grid(images, args.out_dir / "grid.png", cols=n, scale=4)
    print(f"wrote {len(images)} samples and grid.png to {args.out_dir}")


if __name__ == "__main__":
    main()
