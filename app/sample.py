"""Sample images from a training checkpoint; model, stage, resolution, VAE and text encoder come from its metadata.

    python -m app.sample --model-path outputs/embedded/stage5/checkpoints/step_00000150.pt \\
        --prompt "a large red circle in the top left on a gray background" --seed 0 --out-dir outputs/samples
    python -m app.sample --model-path outputs/embedded/stage1/checkpoints/step_00000800.pt \\
        --class-label 0 --class-label 3 --num-samples 4 --seed 0 --out-dir outputs/samples

--bucket HxW (height first) draws at one of the aspect-ratio buckets, --list-buckets prints the checkpoint's.

Writes one PNG per sample, named by what it shows and its seed (prompt_<k>_seed_<s>.png for prompt k, or
class_<label>_seed_<s>.png), a grid.png with a row per prompt or class, and with --gif the denoising
trajectory of each sample. Sample i of prompt (or class) k has seed `--seed + k * --num-samples + i`: the same
seed gives the same pixels. Steps, guidance and alpha default to what the checkpoint's stage previewed with.

Every setting is checked by app/validation.py, as in the Gradio app, after the checkpoint is loaded (the ranges
widen to its own defaults): finite numbers in range, sizes that are multiples of the model's patch, prompts that
fit its tokenizer (never cut), and a cost within --max-tflop (the transformer's FLOPs at the size asked, x the
solver's evaluations x steps x images, x 2 with guidance). The text encoder, tokenizer and VAE come from the hub ids
the checkpoint records or the bundled MiniLM; --text-encoder, --tokenizer and --vae load them from a folder
instead, and only --trust-remote-code lets an encoder run its own code. A text encoder whose weights are not the
ones the checkpoint trained with is refused unless --allow-other-text-encoder.

--lora DIR merges a LoRA adapter (a LoRA run's out_dir/adapter, core/lora.py) into the checkpoint's weights at
--lora-scale S (default 1; 0 draws the base alone); it must have been trained for the checkpoint's network.
"""

import argparse
from pathlib import Path

from app.precision import add_fp32_flag
from app.sources import add_lora_flags, add_source_flags
from app.validation import BATCH
from core.cli_help import HelpFormatter
from flow.methods import ADAPTIVE_METHODS, FIXED_METHODS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, required=True,
                   help="checkpoint written by the trainer, or a run folder / its checkpoints/ (the newest)")
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
    p.add_argument("--bucket", default=None,
                   help="HxW in pixels, height first: sets --height and --width (e.g. one of --list-buckets)")
    p.add_argument("--list-buckets", action="store_true",
                   help="print the checkpoint's aspect-ratio buckets (its trained ones, or PixArt-alpha's rule at "
                        "its resolution) and exit")
    p.add_argument("--gif", action="store_true", help="also write each sample's denoising trajectory as a GIF")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    add_fp32_flag(p)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--max-prompt-chars", type=int, default=BATCH.prompt_chars, help="longest prompt, in characters")
    p.add_argument("--max-tflop", type=float, default=None,
                   help="budget of a request in teraFLOP of the transformer: its FLOPs at the size asked x solver "
                        "evaluations x steps x images, x 2 with guidance (default: 100 on a CPU, 20,000 on a GPU)")
    add_source_flags(p)
    add_lora_flags(p)
    return p.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(prompt, how messages name it): each --prompt, and each non-blank line of --prompts-file."""
    given = args.prompt or []
    prompts = [(text, "--prompt" if len(given) == 1 else f"--prompt #{k + 1}") for k, text in enumerate(given)]
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            raise SystemExit(f"--prompts-file {args.prompts_file}: no such file")
        lines = args.prompts_file.read_text().splitlines()
        prompts += [(line, f"--prompts-file {args.prompts_file} line {i + 1}") for i, line in enumerate(lines)
                    if line.strip()]
    return prompts


def apply_bucket(args: argparse.Namespace) -> None:
    """--bucket HxW as --height and --width; one or the other, not both."""
    if args.bucket is None:
        return
    from data.buckets import parse_bucket

    if args.height is not None or args.width is not None:
        raise SystemExit("--bucket sets --height and --width: give one or the other")
    try:
        bucket = parse_bucket(args.bucket)
    except ValueError as err:
        raise SystemExit(f"--bucket: {err}") from err
    args.height, args.width = bucket.height, bucket.width


def limits_from_args(args: argparse.Namespace):
    """The CLI's limits: BATCH, with the character limit and the budget the flags set."""
    from dataclasses import replace

    from app.validation import check_number

    chars = check_number("--max-prompt-chars", args.max_prompt_chars, (1, 10**6), integer=True)
    budget = None if args.max_tflop is None else check_number("--max-tflop", args.max_tflop, (1e-9, 1e12))
    return replace(BATCH, prompt_chars=chars, tflop=budget)


def main(argv=None) -> None:
    args = parse_args(argv)
    from PIL import Image

    from app.pipeline import CheckpointError, load_pipeline
    from app.sources import lora_from_args, sources_from_args
    from app.validation import CLI, RequestError, check_number
    from core.images import save_grid
    from core.writable import writable_folder

    apply_bucket(args)
    try:
        writable_folder(args.out_dir, f"--out-dir {args.out_dir}")  # before any image is drawn
    except ValueError as err:
        raise SystemExit(str(err)) from None
    try:
        limits = limits_from_args(args)
        pipe = load_pipeline(args.model_path, args.weights, args.device, sources_from_args(args), limits,
                             fp32=args.fp32, lora=lora_from_args(args))
    except (CheckpointError, RequestError) as err:
        raise SystemExit(str(err)) from err
    if args.list_buckets:
        for h, w in pipe.buckets:
            print(f"{h}x{w}  (height x width, h/w {h / w:.2f})")
        return
    prompts = read_prompts(args)
    try:
        if pipe.is_text:
            if args.class_label:
                raise SystemExit(f"--model-path {args.model_path} is text-conditional: use --prompt, not --class-label")
            if not prompts:
                raise SystemExit("a text-conditional checkpoint needs --prompt or --prompts-file")
            items = [pipe.check_prompt(name, text, chars_name=CLI.prompt_chars) for text, name in prompts]
            names = [f"prompt_{k:02d}" for k in range(len(items))]
        else:
            if prompts:
                raise SystemExit(f"--model-path {args.model_path} is class-conditional: use --class-label, "
                                 "not --prompt")
            null = pipe.conditioning.null_label
            items = args.class_label if args.class_label is not None else list(range(null))
            names = [f"class_{c}" for c in items]
        n = check_number("--num-samples", args.num_samples, pipe.limits.num_images, integer=True)
        expanded = [item for item in items for _ in range(n)]
        seeds = [args.seed + k * n + i for k in range(len(items)) for i in range(n)]
        key = "prompts" if pipe.is_text else "labels"
        out = pipe.generate(
            **{key: expanded}, seeds=seeds, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha,
            cfg_interval=tuple(args.cfg_interval), method=args.method, height=args.height, width=args.width,
            return_trajectory=args.gif, names=CLI,
        )
    except RequestError as err:
        raise SystemExit(str(err)) from err
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
    save_grid(images, args.out_dir / "grid.png", cols=n, scale=4)
    print(f"wrote {len(images)} samples and grid.png to {args.out_dir}")


if __name__ == "__main__":
    main()
