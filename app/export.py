"""Export a training checkpoint as weights other tools load: safetensors, a diffusers pipeline, stock PixArt.

    python -m app.export --model-path outputs/embedded/stage5 --out-dir exported/stage5
    python -m app.export --model-path run/checkpoints/step_00001000.pt --out-dir px --format pixart --weights raw
    python -m app.export --model-path CKPT --out-dir DIR --push-to-hub me/my-model        # private unless --public
    python -m app.export --model-path BASE --merge-lora RUN/adapter --out-dir merged        # a LoRA merged in
    python -m app.export --model-path BASE --format pixart --lora RUN/adapter --out-dir px  # ... or beside it

Formats (every one writes safetensors only, never a pickle, the model's config as JSON, and a README.md model card
built from what the checkpoint and its run recorded, app/model_card.py):

    diffusers        (default) a pipeline folder for app/diffusers_pipeline.py:RFDiTPipeline.from_pretrained: the
                     transformer (app/diffusers_models.py, this repo's parameter names), FlowMatchEulerDiscreteScheduler
                     (shift = alpha), the VAE (AutoencoderKL, or IdentityAutoencoder in pixel space), tokenizer and
                     text encoder; any family
    pixart           the same folder with a stock diffusers PixArtTransformer2DModel as the transformer
                     (PixArtTransformer2DModel.from_pretrained(DIR, subfolder="transformer")); pixart models only,
                     velocity-trained
    pixart-original  one safetensors file in the key layout of the PixArt-alpha repository's .pth (what ComfyUI's
                     PixArt loader reads), with the model's PixArt arguments as JSON; pixart with caption_projection
    safetensors      the state dict as it is (model.safetensors, the checkpoint's own names) and config.json

LoRA (core/lora.py): --merge-lora DIR merges an adapter into the weights (at --lora-scale) before any format is written.
--lora DIR (--format pixart) writes the adapter unmerged beside the stock transformer, on its modules
(models/conversion.py: pixart_lora_to_diffusers), as OUT/transformer_lora in peft's format:
`peft.PeftModel.from_pretrained(transformer, OUT/transformer_lora)`. diffusers' own LoRA loaders do not apply:
PixArtTransformer2DModel has no PeftAdapterMixin (no load_lora_adapter) and PixArtAlphaPipeline no
load_lora_weights (diffusers 0.42 and its main branch of 2026-08).

The text encoder, tokenizer and VAE load from where the checkpoint says (hub ids or the bundled MiniLM), or from the
--text-encoder / --tokenizer / --vae folders (app/sources.py). Every flag is checked before the model loads or
anything is written (--out-dir, --eval-report, the --push-to-hub id). The folder is written under a temporary name
beside --out-dir and renamed into place when complete. An export leaves a marker in its folder (.rfdit-export.json,
the files it wrote): --force replaces an existing --out-dir only when that marker says an earlier export wrote it
and it holds nothing else, and never the folder holding the checkpoint or the working directory; any other folder is
refused, --force or not. Nothing is uploaded unless --push-to-hub is given; the token comes from the environment
(HF_TOKEN) or a saved `hf auth login`.
"""

import argparse
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

import torch

from app.sources import add_source_flags
from core.cli_help import HelpFormatter

FORMATS = ("diffusers", "pixart", "pixart-original", "safetensors")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, required=True,
                   help="checkpoint written by the trainer, or a run folder / its checkpoints/ (the newest)")
    p.add_argument("--out-dir", type=Path, required=True, help="the folder to write (created; see --force)")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--format", choices=FORMATS, default="diffusers")
    p.add_argument("--force", action="store_true",
                   help="replace an existing --out-dir that an earlier export wrote (and nothing else)")
    p.add_argument("--eval-report", type=Path, action="append", default=[],
                   help="an evaluation report (python -m evaluation.evaluate --json) to quote in the model card")
    p.add_argument("--license", default=None, help="the model card's licence field (default: none; see its Data)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="upload the folder to this Hub repository")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create the repository public")
    g = p.add_argument_group("LoRA (core/lora.py)")
    g.add_argument("--merge-lora", metavar="DIR", type=Path, default=None,
                   help="merge this LoRA adapter (or a LoRA run's out_dir: its adapter/) into the weights first")
    g.add_argument("--lora-scale", type=float, default=1.0, metavar="S", help="--merge-lora: the update times S")
    g.add_argument("--lora", metavar="DIR", type=Path, default=None,
                   help="--format pixart: also write this adapter unmerged, on the stock transformer's modules, as "
                        "OUT/transformer_lora (peft's format)")
    add_source_flags(p)
    return p.parse_args(argv)


# ---- what each format needs --------------------------------------------------------------------------------


def check_format(fmt: str, record, where: str) -> None:
    """SystemExit naming the flag and the key when the checkpoint cannot be written in `fmt`."""
    cfg = record.model_config
    if fmt in ("pixart", "pixart-original") and cfg.family != "pixart":
        raise SystemExit(f"--format {fmt}: {where} is a {cfg.family} model; only model=pixart (models/pixart.py) is "
                         "PixArt-alpha's transformer. Use --format diffusers or safetensors")
    if fmt in ("pixart", "pixart-original") and record.prediction != "velocity":
        raise SystemExit(f"--format {fmt}: {where} predicts {record.prediction!r} (train.prediction); stock PixArt "
                         "consumers expect velocity. Train with train.prediction=velocity, or use --format diffusers "
                         "(RFDiTPipeline converts)")
    if fmt == "pixart-original" and not cfg.caption_projection:
        raise SystemExit(f"--format pixart-original: {where} has no caption MLP, which the PixArt-alpha layout always "
                         "has (model.overrides.caption_projection=true); use --format pixart")


MARKER = ".rfdit-export.json"
"""What an export writes into its folder last: that app.export wrote it, and which files (--force's warrant)."""
WRITTEN_BY = "python -m app.export"


def check_flags(args: argparse.Namespace) -> None:
    """SystemExit naming the flag for what can be told before any work: --out-dir that is the working directory
    (or holds it) or a filesystem root, a missing --eval-report, a --push-to-hub id the Hub would refuse, --public
    without --push-to-hub."""
    out = args.out_dir.resolve()
    if out == out.parent or Path.cwd().resolve().is_relative_to(out):
        raise SystemExit(f"--out-dir {args.out_dir} is the working directory or holds it: name a new folder for the "
                         "export")
    for report in args.eval_report:
        if not report.is_file():
            raise SystemExit(f"--eval-report {report}: no such file")
    if args.public and not args.push_to_hub:
        raise SystemExit("--public goes with --push-to-hub (it makes the uploaded repository public)")
    if args.push_to_hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.push_to_hub)
        except HFValidationError as err:
            raise SystemExit(f"--push-to-hub {args.push_to_hub!r}: not a Hub repository id (owner/name: "
                             f"{' '.join(str(err).split())[:200]})") from None


def check_destination(out_dir: Path, checkpoint_path: Path, force: bool) -> None:
    """SystemExit unless `out_dir` is free, or (with `force`) an earlier export's folder: its marker says so and
    it holds nothing the export did not write."""
    if checkpoint_path.resolve().is_relative_to(out_dir.resolve()):
        raise SystemExit(f"--out-dir {out_dir} holds the checkpoint {checkpoint_path}: replacing it would delete it")
    if out_dir.is_symlink():
        raise SystemExit(f"--out-dir {out_dir} is a symbolic link: name the folder itself")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise SystemExit(f"--out-dir {out_dir} is a file, not a folder")
    if not force:
        raise SystemExit(f"--out-dir {out_dir} exists; pass --force to replace an earlier export there")
    problem = not_an_export(out_dir)
    if problem:
        raise SystemExit(f"--out-dir {out_dir}: {problem}; --force replaces only a folder an earlier export wrote, "
                         "as it left it: choose another --out-dir, or move this one aside yourself")


def not_an_export(folder: Path) -> str | None:
    """Why `folder` is not an earlier export's, as it left it (None when it is): no marker, a marker that is not
    app.export's, or files beyond those the marker lists (a user's, or another run's)."""
    marker = folder / MARKER
    if not marker.is_file() or marker.is_symlink():
        return f"it is not an earlier export's folder (no {MARKER} in it)"
    try:
        record = json.loads(marker.read_bytes()[: 16 << 20])
    except (OSError, ValueError, RecursionError):
        record = None
    files = record.get("files") if isinstance(record, dict) and record.get("written_by") == WRITTEN_BY else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return f"its {MARKER} is not one app.export wrote"
    extra = sorted(set(written_files(folder)) - set(files) - {MARKER})
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        return f"it holds files the export did not write ({', '.join(extra[:3])}{more})"
    return None


def written_files(folder: Path) -> list[str]:
    """Every file (and link) under `folder`, relative to it, without following links."""
    out = []
    for root, dirs, names in os.walk(folder):
        here = Path(root).relative_to(folder)
        out += [str(here / n) for n in names]
        out += [str(here / d) for d in dirs if (Path(root) / d).is_symlink()]
    return sorted(out)


# ---- writing -----------------------------------------------------------------------------------------------


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def diffusers_pipeline(pipe, stock_pixart: bool = False):
    """app/pipeline.py's Pipeline (model, conditioning, VAE, metadata) as an RFDiTPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel

    from app.diffusers_models import IdentityAutoencoder, RFDiTTransformer2DModel
    from app.diffusers_pipeline import RFDiTPipeline
    from models.conversion import pixart_diffusers_config, pixart_to_diffusers

    record, model = pipe.record, pipe.model
    defaults = pipe.defaults()
    if stock_pixart:
        transformer = PixArtTransformer2DModel(**pixart_diffusers_config(model.config))
        transformer.load_state_dict(pixart_to_diffusers(model.state_dict(), model.config), strict=True)
        transformer.eval()
    else:
        transformer = RFDiTTransformer2DModel.from_model(model)
    vae_info = record.vae or {"id": "identity"}
    if vae_info.get("id") == "identity":
        vae = IdentityAutoencoder(latent_channels=model.config.in_channels)
    else:
        vae = pipe.vae.vae.to("cpu", torch.float32)
        vae.register_to_config(scaling_factor=pipe.vae.scale, shift_factor=pipe.vae.shift)
    text = dict(tokenizer=pipe.conditioning.tokenizer.tokenizer, text_encoder=pipe.conditioning.encoder.encoder) \
        if pipe.is_text else {}
    return RFDiTPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=float(defaults["alpha"])), vae=vae,
        prediction=record.prediction, pixel_range=list(vae_info.get("pixel_range", (-1.0, 1.0))),
        text_len=model.config.text_len if pipe.is_text else None,
        class_names=None if pipe.is_text else list(pipe.conditioning.class_names), image_size=pipe.image_size,
        defaults=defaults, **text,
    )


def original_arguments(cfg) -> dict[str, Any]:
    """The PixArt-alpha repository's model arguments (PixArt.py) that describe a pixart model, for its loaders."""
    from models.pixart import diffusers_position_scale

    base, scale = diffusers_position_scale(cfg)
    return dict(input_size=cfg.input_size, patch_size=cfg.patch, in_channels=cfg.in_channels, hidden_size=cfg.dim,
                depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, caption_channels=cfg.text_dim,
                model_max_length=cfg.text_len, lewei_scale=scale, base_size=base, learn_sigma=False, pred_sigma=False,
                prediction="flow (noise - data), timestep = 1000 sigma",
                mlp_activation={"gelu_tanh": "GELU(tanh)", "silu": "SiLU"}[cfg.activation])


def write_format(fmt: str, pipe, folder: Path) -> str:
    """Write `fmt` into `folder`; returns the model card's usage text for it."""
    model, cfg, record = pipe.model, pipe.model.config, pipe.record
    if fmt == "safetensors":
        config = dict(model=cfg.to_dict(), metadata=record.to_dict())
        save_safetensors(model.state_dict(), folder / "model.safetensors", {"format": "pt", "rfdit": json.dumps(
            config, default=str)})
        write_json(folder / "config.json", config)
        return USAGE["safetensors"]
    if fmt == "pixart-original":
        from models.conversion import pixart_to_original

        save_safetensors(pixart_to_original(model.state_dict(), cfg), folder / "pixart_alpha.safetensors",
                         {"format": "pt"})
        write_json(folder / "config.json", dict(pixart_alpha=original_arguments(cfg), model=cfg.to_dict(),
                                                metadata=record.to_dict()))
        return USAGE["pixart-original"]
    diffusers_pipeline(pipe, stock_pixart=fmt == "pixart").save_pretrained(folder, safe_serialization=True)
    return USAGE[fmt].format(example=_example_call(pipe))


def _example_call(pipe) -> str:
    if pipe.is_text:
        return 'pipe("a large red circle in the top left on a gray background", generator=torch.manual_seed(0))'
    return "pipe(class_labels=[0], generator=torch.manual_seed(0))"


USAGE = {
    "diffusers": "```python\nimport torch\nfrom app.diffusers_pipeline import RFDiTPipeline\n\n"
                 "pipe = RFDiTPipeline.from_pretrained(\"THIS_FOLDER\")\nimage = {example}.images[0]\n```",
    "pixart": "```python\nimport torch\nfrom diffusers import PixArtTransformer2DModel\n"
              "from app.diffusers_pipeline import RFDiTPipeline\n\n"
              "transformer = PixArtTransformer2DModel.from_pretrained(\"THIS_FOLDER\", subfolder=\"transformer\")\n"
              "pipe = RFDiTPipeline.from_pretrained(\"THIS_FOLDER\")\nimage = {example}.images[0]\n```\n\n"
              "The transformer is stock diffusers: timestep = 1000 sigma with sigma = 1 - t the noise level, output "
              "noise - data, so FlowMatchEulerDiscreteScheduler(shift=alpha) steps it. Guidance was trained against "
              "an all-False caption mask (zero embeddings), not an encoded empty prompt. diffusers' own "
              "PixArtAlphaPipeline can drive it with use_resolution_binning=False, max_sequence_length = the tokenizer "
              "length, and zero negative_prompt_embeds / negative_prompt_attention_mask, but it decodes latents / "
              "scaling_factor without shift_factor and assumes a [-1, 1] VAE: exact for a VAE with shift 0 and that "
              "range only (RFDiTPipeline reads both from this folder).",
    "pixart-original": "`pixart_alpha.safetensors` holds the PixArt-alpha repository's key names; `config.json` its "
                       "model arguments. It is a flow model (noise - data, timestep = 1000 sigma), not PixArt's "
                       "epsilon/learned-sigma DDPM, and conditions on this model's text encoder, not T5-XXL.",
    "safetensors": "```python\nfrom safetensors.torch import load_file\nfrom models import ModelConfig, build_model\n"
                   "import json\n\ncfg = json.load(open(\"config.json\"))\n"
                   "model = build_model(ModelConfig(**cfg[\"model\"]))\n"
                   "model.load_state_dict(load_file(\"model.safetensors\"))\n```",
}


def export(args: argparse.Namespace) -> Path:
    """Write args.format to args.out_dir (a temporary folder beside it, renamed into place when complete; an
    earlier export there is kept until then); returns the folder."""
    from app import model_card
    from app.pipeline import CheckpointError, load_pipeline, resolve_checkpoint
    from app.sources import sources_from_args
    from core.checkpoint import read_metadata
    from core.files import host

    check_flags(args)
    try:
        path = resolve_checkpoint(args.model_path)
        record = read_metadata(model_card.light_load(path), f"--model-path {path}")  # the small entries only
    except CheckpointError as err:
        raise SystemExit(str(err)) from err
    check_format(args.format, record, f"--model-path {path}")
    check_destination(args.out_dir, path, args.force)
    if args.lora is not None and args.format != "pixart":
        raise SystemExit(f"--lora writes an adapter for stock diffusers' PixArt transformer: it needs --format pixart, "
                         f"not {args.format}; --merge-lora merges one into any format")
    if args.lora is not None and args.merge_lora is not None:
        raise SystemExit("--lora writes an adapter beside the weights and --merge-lora merges one into them: give one "
                         "(an adapter beside merged weights would apply twice)")
    if args.merge_lora is None and args.lora_scale != 1.0:
        raise SystemExit("--lora-scale needs --merge-lora")
    try:
        evals = model_card.evaluations(path, args.eval_report)
    except model_card.ReportError as err:
        raise SystemExit(str(err)) from err
    stages = model_card.read_lineage(path)
    try:
        merge = (args.merge_lora, args.lora_scale) if args.merge_lora is not None else None
        pipe = load_pipeline(path, args.weights, "cpu", sources_from_args(args), lora=merge)
        adapter = read_lora_for(pipe, args.lora) if args.lora is not None else None
    except CheckpointError as err:
        raise SystemExit(str(err)) from err
    out_dir = args.out_dir.resolve()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{host()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        usage = write_format(args.format, pipe, tmp)
        if adapter is not None:
            write_pixart_lora(adapter, pipe.model.config, tmp / "transformer_lora")
            usage += "\n\n" + USAGE_LORA
        if pipe.lora is not None:
            usage += (f"\n\nThe weights have the LoRA adapter `{pipe.lora['folder']}` merged in at scale "
                      f"{pipe.lora['scale']:g}.")
        parameters = sum(p.numel() for p in pipe.model.parameters())
        folder = json.dumps(args.push_to_hub or str(args.out_dir))  # a Python string literal in the card's snippet
        card = model_card.render(record, parameters, args.format, args.weights, stages,
                                 model_card.data_sources(stages), evals,
                                 usage.replace('"THIS_FOLDER"', folder) + "\n\n"
                                 + reproduce_command(path, args.weights, pipe), args.license)
        (tmp / "README.md").write_text(card)
        write_json(tmp / MARKER, dict(written_by=WRITTEN_BY, format=args.format, files=written_files(tmp)))
        replace_folder(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return args.out_dir


def read_lora_for(pipe, folder: Path):
    """The adapter --lora names, checked to fit the exported checkpoint's network."""
    from core import lora as core_lora

    adapter = core_lora.read_adapter(folder, "--lora")
    core_lora.check_fits(adapter, pipe.model, None, "--lora")
    return adapter


def write_pixart_lora(adapter, cfg, folder: Path) -> None:
    """A pixart adapter on diffusers' PixArtTransformer2DModel modules, in peft's format (same rank and alpha)."""
    import copy

    from core import lora as core_lora
    from models.conversion import pixart_lora_to_diffusers

    try:
        state = pixart_lora_to_diffusers(adapter.state, cfg)
    except ValueError as err:
        raise SystemExit(f"--lora {adapter.folder}: {err}") from err
    config = copy.deepcopy(adapter.config)
    config.target_modules = sorted({k.partition(".lora_")[0] for k in state})
    folder.mkdir(parents=True)
    core_lora.save_lora_files(folder, config, state, {"format": "pt"})


USAGE_LORA = ("A LoRA adapter for the transformer, unmerged, is in `transformer_lora/` (peft's format, on the stock "
              "model's modules):\n\n```python\nfrom peft import PeftModel\n\n"
              "transformer = PeftModel.from_pretrained(transformer, \"THIS_FOLDER/transformer_lora\")\n```")


def replace_folder(new: Path, target: Path) -> None:
    """Move the finished `new` folder to `target`: a rename, after moving an existing `target` (an earlier export,
    check_destination) aside, removed once the new one is in place; so `target` is always one whole export or,
    between two renames, absent with the earlier one beside it (`.NAME.old-HOST-PID`)."""
    old = new.with_name(new.name.replace(".tmp-", ".old-"))
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def reproduce_command(path: Path, weights: str, pipe) -> str:
    """The app/sample.py command that draws the card's example from the training checkpoint itself."""
    what = ('--prompt "a large red circle in the top left on a gray background"' if pipe.is_text
            else "--class-label 0")
    from app.model_card import one_line

    lora = f" --lora {pipe.lora['folder']} --lora-scale {pipe.lora['scale']:g}" if pipe.lora else ""
    return ("The same sample from the training checkpoint (equal to the pipeline's to 1/255 with "
            "`generator=torch.manual_seed(0)`):\n\n```bash\n"
            f"python -m app.sample --model-path {shlex.quote(one_line(str(path), 4096))} --weights {weights} {what}"
            f"{one_line(lora, 4096)} --seed 0 --out-dir samples\n```")


def push_to_hub(folder: Path, repo_id: str, private: bool = True, api=None) -> str:
    """Create `repo_id` (private unless told otherwise; an existing one is kept) and upload `folder` to it with
    huggingface_hub. `api`: an HfApi-like client (tests pass a local stand-in). Returns the repository's URL."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=os.environ.get("HF_TOKEN"))
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                      commit_message=f"rfdit export ({folder.name})")
    return str(url)


def main(argv=None) -> Path:
    args = parse_args(argv)
    folder = export(args)
    print(f"wrote {args.format} export to {folder}")
    if args.push_to_hub:
        url = push_to_hub(folder, args.push_to_hub, private=not args.public)
        print(f"uploaded {folder} to {url}")
    return folder


if __name__ == "__main__":
    main()
