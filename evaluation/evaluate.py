"""Compositional generalisation: how often a text-to-image checkpoint draws the held-out synthetic triples right.

    python -m evaluation.evaluate --model-path CHECKPOINT --samples-per-prompt 4 --json eval/report.json --out-dir eval

The prompts are `held_out_prompts()`: the 40 (colour, shape, position) triples that no training scene contains,
as a large shape on a gray background. Each image is read by `evaluation.analyse.analyse_scene` with the gray
background named, and scored against the triple its prompt names: colour, shape and position separately, and
overall (all three right). A position counts only when the shape's centroid lies in the region_box of the named
position (the analyser's nearest-anchor fallback is a diagnosis, not a match); an image where the analyser finds
no shape is wrong on every attribute.

Size: the checkpoint's trained size, or --height / --width in pixels (any multiple of the model's unit, e.g. a
bucket of a multi-aspect stage: 32 x 48). The scenes' positions are fractions of each axis and shapes a fraction of
the shorter side (data/embedded/synthetic.py), so the analyser reads a non-square image by the same rules.

Seeds: sample j of prompt i uses seed `seed + i * samples_per_prompt + j`, so every image has its own seed, and
an image's seed does not depend on --batch-size (whether its pixels do is up to the pipeline: on a GPU the batch
composition can move the last bits). The same seed and settings give the same numbers.

Output: the report as JSON on stdout (and in --json), the summary table on stderr with the progress bars, and
with --out-dir a grid.png with one row per prompt, where a red frame marks a sample with a wrong attribute and
the text under it names what was read instead.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from app.precision import add_fp32_flag
from core.cli_help import HelpFormatter

_SCORING = ("ATTRIBUTES", "BACKGROUND", "SIZE", "FRAME", "WRONG_RGB", "Judgement", "sample_seed", "generate_held_out",
            "judge_images", "summarise", "evaluate_compositions", "format_table", "render_grid")


def __getattr__(name: str):
    """The scoring (evaluation/compositional.py: torch, the analyser) loads on first use: --help answers at once."""
    if name in _SCORING:
        from evaluation import compositional

        return getattr(compositional, name)
    raise AttributeError(f"module 'evaluation.evaluate' has no attribute {name!r}")


def _number_type(convert: Callable[[str], float], accept: Callable[[float], bool], requirement: str):
    """An argparse type: a bad value is refused, with its flag and the rule named, before a checkpoint is loaded.

    `accept` is a comparison, so nan fails it.
    """

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value

    return parse


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number_type(int, lambda v: v >= 0, ">= 0")
_non_negative_float = _number_type(float, lambda v: v >= 0, ">= 0")
_positive_float = _number_type(float, lambda v: v > 0, "> 0")


def parse_args(argv=None) -> argparse.Namespace:
    """The CLI flags; `argv` lets tests parse without a process."""
    p = argparse.ArgumentParser(
        prog="python -m evaluation.evaluate", description=__doc__, formatter_class=HelpFormatter
    )
    p.add_argument("--model-path", type=Path, required=True,
                   help="text-conditional checkpoint written by the trainer, or its run folder (the newest)")
    p.add_argument("--samples-per-prompt", type=_positive_int, default=4)
    p.add_argument("--steps", type=_positive_int, default=24, help="ODE steps")
    p.add_argument("--cfg-scale", type=_non_negative_float, default=3.0, help="classifier-free guidance (1: off)")
    p.add_argument("--alpha", type=_positive_float, default=1.0, help="time-grid warp (> 1: more steps near noise)")
    p.add_argument("--seed", type=_non_negative_int, default=0, help="first seed; see the seed rule above")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--batch-size", type=_positive_int, default=40, help="images per generate() call")
    p.add_argument("--height", type=_positive_int, default=None, help="image height in pixels (default: trained)")
    p.add_argument("--width", type=_positive_int, default=None, help="image width in pixels (default: trained)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_fp32_flag(p)
    p.add_argument("--out-dir", type=Path, default=None, help="write grid.png here")
    p.add_argument("--json", type=Path, default=None, help="write the JSON report here")
    p.add_argument("--max-pixel-steps", type=_positive_int, default=None,
                   help="budget of height x width x steps x images per generate() call (default: app/validation.py's)")
    from app.sources import add_source_flags

    add_source_flags(p)  # --text-encoder / --tokenizer / --vae PATH, --trust-remote-code (app/sources.py)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    """Load the pipeline, refuse a class-conditional checkpoint, then generate, score and write the report."""
    args = parse_args(argv)

    from evaluation.compositional import format_table, generate_held_out, judge_images, render_grid, summarise

    if not args.model_path.exists():
        raise SystemExit(f"--model-path {args.model_path} does not exist")
    from dataclasses import replace

    from app.pipeline import load_pipeline
    from app.sources import sources_from_args
    from app.validation import BATCH, RequestError

    device = args.device  # None: load_pipeline's default (CUDA when available)
    limits = replace(BATCH, pixel_steps=args.max_pixel_steps)
    try:
        pipe = load_pipeline(args.model_path, weights=args.weights, device=device, sources=sources_from_args(args),
                             limits=limits, fp32=args.fp32)
    except ValueError as err:  # app.pipeline.CheckpointError: names the file and, for a source, the flag
        raise SystemExit(str(err)) from err
    conditioning = pipe.metadata.get("conditioning")
    if conditioning == "class":
        raise SystemExit(
            f"--model-path {args.model_path} is a class-conditional checkpoint; "
            "the compositional evaluation needs a text-conditional one"
        )
    if conditioning != "text":
        raise SystemExit(f"--model-path {args.model_path}: unknown conditioning {conditioning!r} in its metadata")

    size = {k: v for k, v in (("height", args.height), ("width", args.width)) if v is not None}

    def generate(prompts: list[str], seeds: list[int]):
        return pipe.generate(prompts=prompts, seeds=seeds, steps=args.steps, cfg_scale=args.cfg_scale, alpha=args.alpha,
                             **size)

    try:
        images = generate_held_out(generate, args.samples_per_prompt, args.seed, args.batch_size)
    except RequestError as err:  # a setting the pipeline refuses (app/validation.py), named
        raise SystemExit(f"--model-path {args.model_path}: {err}") from err
    judgements = judge_images(images, args.samples_per_prompt, args.seed)
    settings = dict(model_path=str(args.model_path), weights=args.weights, steps=args.steps)
    settings |= dict(cfg_scale=args.cfg_scale, alpha=args.alpha, image_size=int(images.shape[1]),
                     height=int(images.shape[1]), width=int(images.shape[2]))
    report = dict(settings=settings) | summarise(judgements, args.samples_per_prompt, args.seed)

    text = json.dumps(report, indent=2)
    print(text)
    print(format_table(report), file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if args.out_dir is not None:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        render_grid(images, judgements, args.samples_per_prompt).save(args.out_dir / "grid.png")
        print(f"wrote {args.out_dir / 'grid.png'}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
