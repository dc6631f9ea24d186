"""Caption, tokenize and VAE-encode WebDataset image tars into latent shards (data/README.md format).

    # one rank of eight, VLM captions in process, SD3 latents of 256 px crops (SLURM: scripts/shard_array.sbatch)
    python data/shard_caption_example.py --base-url 'https://host/train_{i:04d}.tar' --num-shards 100 \\
        --out-dir shards/ --rank 0 --world-size 8 --captioner vllm --vlm-model Qwen/Qwen3-VL-2B-Instruct \\
        --vae sd3 --vae-path /models/stable-diffusion-3-medium-diffusers

    # captions already in the tars (e.g. data.embedded's), pixel space, on a CPU
    python data/shard_caption_example.py --input-glob 'embedded/synthetic-*.tar' --out-dir shards/ \\
        --captioner tar --vae identity --image-size 32

    # 1024 px aspect-ratio buckets (PixArt-alpha's table), SD3 latents, T5Gemma features stored, on a GPU node
    python data/shard_caption_example.py --input-glob '/data/raw/*.tar' --out-dir shards-1024/ --captioner tar \\
        --image-size 1024 --buckets pixart --vae sd3 --vae-path stabilityai/stable-diffusion-3-medium-diffusers \\
        --text-features --text-encoder google/t5gemma-xl-xl-ul2 --max-length 120 --records-per-shard 10000

    # once every rank is done (the last rank to finish also does this by itself)
    python data/shard_caption_example.py --input-glob 'embedded/synthetic-*.tar' --out-dir shards/ --finalize

Rerunning the same command resumes: input tars already done are skipped, interrupted ones are redone
(data/pipeline/run.py explains the design). An input tar that cannot be read whole (cut short on disk or in
transfer, damaged) is reported by name and redone by the next run; the others go on, and the exit status is
1 while any failed. --rank / --world-size default to SLURM_ARRAY_TASK_ID minus
SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT when those are set, else 0 and 1. For --kind labels the
class names (and source, licence) come from --dataset-json, or from a dataset.json beside local input tars.
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

HUB_SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"


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
    g = p.add_argument_group("inputs (one of --base-url/--num-shards or --input-glob)")
    g.add_argument("--base-url", help="tar URL template with an {i} field, e.g. 'https://host/train_{i:04d}.tar'")
    g.add_argument("--num-shards", type=int, help="number of tars the template expands to (i = 0 .. N-1)")
    g.add_argument("--input-glob", help="local tars, e.g. 'data/raw/*.tar' (quote it; sorted)")
    g.add_argument("--dataset-json", type=Path, help="dataset.json with class_names, source, licence")
    g.add_argument("--timeout", type=float, default=60.0, help="seconds to wait on an input URL")
    g = p.add_argument_group("output")
    g.add_argument("--out-dir", type=Path, required=True, help="shard folder (created; shared by all ranks)")
    g.add_argument("--kind", choices=("text", "labels"), default="text", help="text captions or class labels")
    g.add_argument("--num-classes", type=int, help="kind=labels: class count (default: len(class_names))")
    g.add_argument("--records-per-shard", type=int, default=50_000, help="records per output shard")
    g.add_argument("--source", default=None, help="where the images come from (default: dataset.json or inputs)")
    g.add_argument("--licence", default=None, help="licence of the images (default: dataset.json's)")
    g.add_argument("--finalize", action="store_true", help="only check every tar is done and write manifest.json")
    g = p.add_argument_group("ranks")
    g.add_argument("--rank", type=int, default=None, help="this process's rank (default: SLURM array index, else 0)")
    g.add_argument("--world-size", type=int, default=None, help="number of ranks (default: SLURM array size, else 1)")
    g = p.add_argument_group("images")
    g.add_argument("--image-size", type=int, default=256, help="VAE crop side; smaller images are dropped")
    g.add_argument("--caption-size", type=int, default=512, help="captioner crop side (VLM backends)")
    g.add_argument("--min-std", type=float, default=0.02, help="drop images whose every channel std is below this")
    g.add_argument("--buckets", default=None,
                   help="aspect-ratio buckets: 'pixart' (PixArt-alpha's table at --image-size: 256, 512, 1024) or "
                        "HxW,HxW,... in pixels, height first; each image goes to the nearest (default: square crops)")
    g.add_argument("--batch-size", type=int, default=64, help="images per captioner / VAE batch")
    g.add_argument("--decode-workers", type=int, default=4, help="threads decoding and resizing images")
    g = p.add_argument_group("captions")
    g.add_argument("--captioner", choices=("vllm", "openai", "tar"), default="tar", help="caption backend")
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
    g = p.add_argument_group("encoders")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder or hub id (default: bundled MiniLM)")
    g.add_argument("--max-length", type=int, default=120, help="tokens per caption (padded / truncated)")
    g.add_argument("--text-features", action="store_true",
                   help="also store the frozen text encoder's states of every caption (the trainer then loads no "
                        "encoder: data/features.py)")
    g.add_argument("--text-encoder", default=None,
                   help="--text-features: encoder folder or hub id (default: the bundled MiniLM); its tokenizer is "
                        "the default --tokenizer")
    g.add_argument("--text-encoder-subfolder", default=None, help="e.g. text_encoder inside a pipeline checkout")
    g.add_argument("--text-encoder-device", default=None, help="cuda or cpu (default: cuda if available)")
    g.add_argument("--writer-memory-mb", type=int, default=256,
                   help="records kept in memory before the shard writers append them to disk (all buckets)")
    g.add_argument("--vae", choices=("sd3", "identity"), default="sd3", help="latent space (identity = pixels)")
    g.add_argument("--vae-path", default=HUB_SD3, help="diffusers VAE folder or hub id")
    g.add_argument("--vae-subfolder", default="vae", help="VAE subfolder of a pipeline checkout")
    g.add_argument("--vae-scale", type=float, default=None, help="x1 = (z - shift) * scale; default: VAE config")
    g.add_argument("--vae-shift", type=float, default=None, help="default: VAE config (SD3: 0.0609)")
    g.add_argument(
        "--pixel-range", type=_pixel_range, default="0,1", help="VAE input range: 0,1 (reference) or -1,1 (SD3)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _dataset_info(args: argparse.Namespace, inputs: list[str]) -> dict[str, Any]:
    path = args.dataset_json
    if path is None and args.input_glob and (Path(inputs[0]).parent / "dataset.json").exists():
        path = Path(inputs[0]).parent / "dataset.json"
    return json.loads(path.read_text()) if path else {}


def _check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    for flag in ("num_shards", "records_per_shard", "image_size", "caption_size", "batch_size", "max_length",
                 "writer_memory_mb"):
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
    if args.text_encoder is not None and not args.text_features:
        parser.error("--text-encoder is read with --text-features only")
    if args.buckets is not None:
        from data.buckets import parse_buckets

        try:
            args.buckets = parse_buckets(args.buckets, args.image_size)
        except ValueError as err:
            parser.error(f"--buckets: {err}")


def _captioner(args: argparse.Namespace) -> Any:
    from data.pipeline import captioners as c

    short = args.kind == "text" and not args.no_short_captions
    if args.captioner == "tar":
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.rank is None:
        task, first = _env_int("SLURM_ARRAY_TASK_ID", parser), _env_int("SLURM_ARRAY_TASK_MIN", parser) or 0
        args.rank = 0 if task is None else task - first
    if args.world_size is None:
        args.world_size = _env_int("SLURM_ARRAY_TASK_COUNT", parser) or 1
    _check(args, parser)
    try:
        inputs = list_inputs(args.base_url, args.num_shards, args.input_glob)
    except SourceError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")

    from data.pipeline.captioners import CaptionerError
    from data.pipeline.run import PipelineConfig, PipelineError, finalize, run_rank

    try:
        if args.finalize:
            manifest = finalize(args.out_dir, inputs)
            print(f"finalized {args.out_dir}: {len(manifest['shards'])} shards, {manifest['num_records']} records")
            return 0
        info = _dataset_info(args, inputs)
        class_names = info.get("class_names")
        if args.kind == "labels" and not (args.num_classes or class_names):
            parser.error("--kind labels needs --num-classes or a --dataset-json with class_names")
        described = dict(base_url=args.base_url, num_shards=args.num_shards) if args.base_url else {}
        cfg = PipelineConfig(
            inputs=inputs, out_dir=args.out_dir, kind=args.kind, image_size=args.image_size,
            caption_size=args.caption_size, rank=args.rank, world_size=args.world_size,
            records_per_shard=args.records_per_shard, batch_size=args.batch_size, min_std=args.min_std,
            short_captions=not args.no_short_captions, num_classes=args.num_classes or len(class_names or []) or None,
            class_names=class_names, source=args.source or info.get("source") or args.base_url or args.input_glob,
            licence=args.licence or info.get("licence", ""),
            inputs_description=described or dict(input_glob=args.input_glob, num_inputs=len(inputs)),
            decode_workers=args.decode_workers, timeout=args.timeout, progress=not args.quiet, buckets=args.buckets,
            text_features=args.text_features, text_encoder_subfolder=args.text_encoder_subfolder,
            buffer_bytes=args.writer_memory_mb << 20,
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
        f"rank {args.rank}/{args.world_size}: {len(result.processed)} tars processed, {len(result.skipped)} skipped, "
        f"{len(result.failed)} failed; {c.written} records written of {c.seen} samples (dropped: {c.too_small} too "
        f"small, {c.degenerate} flat, {c.undecodable} undecodable, {c.no_caption} without caption)"
    )
    if result.failed:
        for message in result.failed.values():
            print(f"error: {message}", file=sys.stderr)
        print(
            f"error: {len(result.failed)} input tars failed ({', '.join(result.failed)}): their shards were removed "
            "and manifest.json is not written; rerun the same command to retry them",
            file=sys.stderr,
        )
        return 1
    if result.manifest is not None:
        print(f"every input tar is done: wrote {args.out_dir / 'manifest.json'} ({result.manifest['num_records']})")
    else:
        print("other ranks still have tars to do; the last one writes manifest.json (or run with --finalize)")
    return 0


def _encoders(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Any, Any]:
    from core.tokenizer import TextTokenizer, default_tokenizer_path
    from core.vae import SD3VAE, IdentityVAE

    tokenizer = None
    if args.kind == "text":
        tokenizer = TextTokenizer(args.tokenizer or args.text_encoder or default_tokenizer_path(), args.max_length)
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
