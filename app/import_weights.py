"""Import published weights as a checkpoint of this repository, which the sampler, the app, export and every
training stage (train.init_from) then take like any other.

    python -m app.import_weights PixArt-alpha/PixArt-Sigma-XL-2-1024-MS --out runs/sigma/init.pt   # a Hub id
    python -m app.import_weights ./PixArt-XL-2-1024-MS.pth --out runs/alpha/init.pt               # PixArt's .pth
    python -m app.import_weights exported/stage5 --out stage5.pt            # this repo's export (diffusers/safetensors)
    python -m app.import_weights old_run/checkpoints/model_300000.pt --out stage1.pt       # the reference repo's
    python train_stage3.py model=pixart ... train.init_from=PixArt-alpha/PixArt-Sigma-XL-2-1024-MS  # in memory

What it reads (`detect`), each into the family that computes the same function:

    diffusers        a PixArtTransformer2DModel folder, a pipeline folder holding one (transformer/), or a Hub id of
                     either (PixArt-alpha and PixArt-Sigma): model=pixart (models/pixart.py). learn_sigma's variance
                     channels are dropped, PixArt-alpha 1024-MS's size and aspect-ratio embedders are folded in at
                     its square size (both reported); this repo's `--format pixart` export reads the same way
    pixart-original  the PixArt-alpha repository's .pth / .safetensors keys (x_embedder, t_block.1, blocks.N.attn.qkv,
                     y_embedder ...), its {"state_dict": ...} file or this repo's `--format pixart-original` export:
                     renamed to diffusers' and read as above (models/conversion.py: original_to_diffusers)
    rfdit-diffusers  this repo's `--format diffusers` export (RFDiTPipeline): the transformer's own weights and config
    rfdit-safetensors  this repo's `--format safetensors` export (model.safetensors + config.json): weights and metadata
    reference        the reference repository's checkpoints ({"model", "model_ema", ...}; `dit_blocks.*`, `_orig_mod.`,
                     te.Linear's `_extra_state`): ccdit or mmdit (models/reference_layout.py)

The checkpoint holds `model` and `ema` (the same tensors unless the source had both), `step` 0 and the metadata
(core/checkpoint.py CheckpointMetadata) with `imported` = {source, layout, revision, notes}: where it came from and
what was not carried exactly. The prediction it records is what the weights were trained for: `epsilon` for PixArt's
published DDPM models, which this repo's flow sampler refuses (they need fine-tuning to velocity first: README, "Fine-
tune a published model"), `velocity` for this repo's exports and the reference's.

Safety: local files load through safetensors or torch.load(weights_only=True); a Hub id downloads only configs and
safetensors (huggingface_hub.snapshot_download with allow_patterns; HF_HUB_OFFLINE=1 reads the cache); diffusers'
loaders never run remote code. A file that is not one of the layouts is refused with the missing and unexpected keys
and the layout that was expected.
"""

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from core.checkpoint import CheckpointError
from core.cli_help import HelpFormatter
from models import ModelConfig

LAYOUTS = ("diffusers", "pixart-original", "rfdit-diffusers", "rfdit-safetensors", "reference")
HUB_PATTERNS = ["*.json", "transformer/*.safetensors", "diffusion_pytorch_model*.safetensors", "model*.safetensors"]
"""What a Hub id downloads: every config (small) and the transformer's safetensors at the root or in transformer/, never
the text encoder's or VAE's weights, never a pickle."""
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
"""Files read with torch.load(weights_only=True)."""


class ImportSourceError(CheckpointError):
    """A source that cannot be imported: the message names it, and the keys or file that do not fit."""


@dataclass
class ImportOptions:
    """What a file cannot say about itself, and the choices of the import."""

    weights: str = "ema"
    """A source with raw and averaged weights (the reference's model / model_ema): which becomes `ema` (both are
    kept; `model` is the raw one)."""
    revision: str | None = None
    """Hub id sources: the branch, tag or commit."""
    prediction: str | None = None
    """What the weights were trained to predict, when the source does not say (None: the layout's default)."""
    text_len: int | None = None
    """Caption tokens (PixArt: the null caption's length or 120; the reference: 120)."""
    input_size: int | None = None
    """The reference: its latent side (32, 256 px through the SD3 VAE); PixArt-original without pos_embed."""
    heads: int | None = None
    """PixArt-original: attention heads (PixArt's head width 72 when not given)."""
    text_encoder: str | None = None
    """A hub id (or `bundled`, the MiniLM) to record as the text encoder instead of the layout's default."""
    tokenizer: str | None = None
    """Likewise for the tokenizer."""
    vae: str | None = None
    """A hub id to record as the VAE (with subfolder vae) instead of the layout's default."""


@dataclass
class Imported:
    """One imported model: its config, raw and averaged weights, metadata and what did not carry exactly."""

    config: ModelConfig
    model: dict[str, Tensor]
    ema: dict[str, Tensor]
    metadata: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def checkpoint(self) -> dict[str, Any]:
        """The checkpoint dict (core/checkpoint.py's format) that torch.save writes."""
        return dict(model=self.model, ema=self.ema, step=0, metadata=self.metadata)


# ---- where the files are ---------------------------------------------------------------------------------------


def resolve_source(source: str | Path, revision: str | None = None) -> Path:
    """A local file or folder as it is; a Hub id (owner/name) downloaded, configs and safetensors only, into the
    huggingface_hub cache (with HF_HUB_OFFLINE=1: read from it)."""
    from core.hub import is_hub_id

    path = Path(source)
    if path.exists():
        return path
    if not is_hub_id(str(source)):
        raise ImportSourceError(f"{source}: no such file or folder, and not a Hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(source), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline without a cached copy, a missing or gated repository, no network
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ImportSourceError(f"{source}: cannot download it from the Hub ({type(err).__name__}: {reason}); "
                                "without network, set HF_HUB_OFFLINE=1 with a cached copy or pass a local folder") \
            from err


def _json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ImportSourceError(f"{path}: not readable JSON ({err})") from err
    if not isinstance(value, dict):
        raise ImportSourceError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


def read_tensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """(the file's contents, its safetensors header metadata): safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError) as err:
            raise ImportSourceError(f"{path}: not a readable safetensors file ({err})") from err
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ImportSourceError(f"{path}: a {path.suffix or 'suffix-less'} file; expected .safetensors or one of "
                                f"{', '.join(WEIGHT_SUFFIXES)}")
    from core.checkpoint import load

    try:
        return load(path), {}
    except CheckpointError as err:
        raise ImportSourceError(str(err)) from err


# ---- which layout --------------------------------------------------------------------------------------------


def detect(path: Path) -> tuple[str, Path]:
    """(the layout, the folder or file to read it from) of a local source."""
    if path.is_dir():
        if (path / "model_index.json").is_file():
            index = _json(path / "model_index.json")
            if not (path / "transformer" / "config.json").is_file():
                raise ImportSourceError(f"{path}: a pipeline folder ({index.get('_class_name')}) without "
                                        "transformer/config.json")
            stock = _json(path / "transformer" / "config.json").get("_class_name") != "RFDiTTransformer2DModel" and \
                "architecture" not in _json(path / "transformer" / "config.json")
            return ("diffusers" if stock else "rfdit-diffusers"), path
        config = path / "config.json"
        if config.is_file():
            record = _json(config)
            if "architecture" in record:
                return "rfdit-diffusers", path
            if "_class_name" in record:
                return "diffusers", path
            if "model" in record and (path / "model.safetensors").is_file():
                return "rfdit-safetensors", path
            if "pixart_alpha" in record and (path / "pixart_alpha.safetensors").is_file():
                return "pixart-original", path / "pixart_alpha.safetensors"
        if (path / "transformer" / "config.json").is_file():
            return "diffusers", path
        raise ImportSourceError(f"{path}: a folder with no model_index.json, config.json or transformer/config.json; "
                                f"expected one of the layouts {', '.join(LAYOUTS)} (python -m app.import_weights -h)")
    return "file", path


def state_dict_of(contents: dict[str, Any], where: Path) -> tuple[dict[str, Tensor], dict | None]:
    """(the raw weights, the averaged ones or None) of a loaded file: a bare state dict, PixArt's {"state_dict",
    "state_dict_ema"}, the reference's {"model", "model_ema"}, or this repo's {"model", "ema"}."""
    for raw_key, ema_key in (("state_dict", "state_dict_ema"), ("model", "model_ema"), ("model", "ema")):
        if isinstance(contents.get(raw_key), dict):
            ema = contents.get(ema_key) if isinstance(contents.get(ema_key), dict) else None
            return contents[raw_key], ema
    if contents and all(isinstance(v, Tensor) for v in contents.values()):
        return contents, None
    raise ImportSourceError(f"{where}: holds {sorted(contents)[:8]}, neither a state dict nor one under state_dict, "
                            "model or model_ema")


def classify(state: dict[str, Tensor]) -> str:
    """The layout of a bare state dict (wrapper prefixes stripped), from the keys only that layout has."""
    from models.reference_layout import is_reference_state

    if is_reference_state(state):
        return "reference"
    if "x_embedder.proj.weight" in state and "t_block.1.weight" in state:
        return "pixart-original"
    if "adaln_single.linear.weight" in state and "pos_embed.proj.weight" in state:
        return "diffusers-state"
    return "unknown"


# ---- the import ----------------------------------------------------------------------------------------------


def import_weights(source: str | Path, options: ImportOptions | None = None) -> Imported:
    """Read `source` (a file, a folder or a Hub id) in whichever layout it is (module docstring)."""
    from app import import_layouts as layouts
    from models.conversion import strip_wrapper_prefixes

    options = options or ImportOptions()
    if options.weights not in ("ema", "raw"):
        raise ValueError(f"weights must be ema or raw, got {options.weights!r}")
    path = resolve_source(source, options.revision)
    layout, where = detect(path)
    origin = dict(source=str(source), revision=options.revision, path=str(path))
    if layout == "diffusers":
        imported = layouts.from_diffusers(where, options)
    elif layout == "rfdit-diffusers":
        imported = layouts.from_rfdit_diffusers(where, options)
    elif layout == "rfdit-safetensors":
        imported = layouts.from_rfdit_safetensors(where)
    else:
        contents, header = read_tensors(where)
        if "rfdit" in header:
            return _finish(layouts.from_rfdit_safetensors(where, header), "rfdit-safetensors", origin)
        if layout == "pixart-original":  # this repo's pixart-original export: its arguments and metadata beside it
            recorded = _json(where.parent / "config.json")
            imported = layouts.from_pixart_original(contents, recorded.get("pixart_alpha") or {}, options, where,
                                                    recorded.get("metadata"))
            return _finish(imported, layout, origin)
        if isinstance(contents.get("metadata"), dict) and isinstance(contents.get("model"), dict):
            raise ImportSourceError(f"{where}: already a checkpoint of this repository; use it as it is")
        raw, ema = state_dict_of(contents, where)
        raw, prefixes = strip_wrapper_prefixes(raw)
        ema = strip_wrapper_prefixes(ema)[0] if ema is not None else None
        layout = classify(raw)
        if layout == "reference":
            imported = layouts.from_reference(raw, ema, options)
        elif layout == "pixart-original":
            imported = layouts.from_pixart_original(raw if options.weights == "raw" or ema is None else ema, {},
                                                    options, where)
        elif layout == "diffusers-state":
            raise ImportSourceError(f"{where}: a diffusers PixArtTransformer2DModel state dict without its config.json:"
                                    " import the folder save_pretrained wrote (config.json beside the weights)")
        else:
            raise ImportSourceError(
                f"{where}: its keys ({', '.join(sorted(raw)[:6])}, ...) are none of the layouts {', '.join(LAYOUTS)}: "
                "expected PixArt-alpha's (x_embedder.proj.weight, t_block.1.weight, blocks.N.attn.qkv ...) or the "
                "reference's (patchify.weight, dit_blocks.N.attention.attention.q_proj ..., linear_out.weight)")
        if prefixes:
            imported.notes.append(f"stripped the key prefixes {' '.join(prefixes)} (torch.compile / DDP wrappers)")
    return _finish(imported, layout, origin)


def _finish(imported: Imported, layout: str, origin: dict[str, Any]) -> Imported:
    """Record where it came from and what did not carry over exactly; check it builds and loads."""
    from models import build_model
    from models.conversion import _check_state_matches

    for which, state in (("model", imported.model), ("ema", imported.ema)):
        try:
            _check_state_matches(state, imported.config)
        except ValueError as err:
            raise ImportSourceError(f"{origin['source']} ({layout}): the converted {which} weights {err}") from err
    imported.metadata["imported"] = dict(origin, layout=layout, notes=list(imported.notes))
    # A stage that starts from it takes its size from it (trainer/builders.py: carried_fields).
    imported.config.extra["imported_from"] = origin["source"]
    imported.metadata["model"] = imported.config.to_dict()
    imported.metadata.setdefault("parameters", sum(v.numel() for v in imported.model.values()))
    with torch.device("meta"):
        build_model(imported.config)  # the config itself is valid (ModelConfig's own checks)
    return imported


def import_checkpoint(source: str | Path, options: ImportOptions | None = None) -> dict[str, Any]:
    """The checkpoint dict of an imported source (what `train.init_from` reads in memory)."""
    return import_weights(source, options).checkpoint()


def is_importable(source: str | Path) -> bool:
    """Whether `train.init_from` should import `source` rather than read it as this repo's checkpoint or run folder:
    a Hub id that is no local path, a .safetensors file, a .pt / .pth without this repo's metadata (PixArt's, the
    reference's; memory-mapped, so only its small entries are read), or a folder holding a model's config.json or a
    pipeline. A file that does not load is left to the checkpoint reader, which names what is wrong with it."""
    from core.hub import is_hub_id

    path = Path(source)
    if not path.exists():
        return is_hub_id(str(source))
    if path.is_file():
        if path.suffix in WEIGHT_SUFFIXES:
            try:
                contents = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception:
                return False
            return isinstance(contents, dict) and not isinstance(contents.get("metadata"), dict)
        return path.suffix == ".safetensors"
    return any((path / name).is_file() for name in ("model_index.json", "config.json", "transformer/config.json"))


# ---- the command line ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", help="a file, a folder or a Hub id (owner/name) in one of the layouts above")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint to write (.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--weights", choices=("ema", "raw"), default="ema",
                   help="a source with raw and averaged weights: which becomes `ema` (what samplers read)")
    p.add_argument("--revision", default=None, help="Hub ids: branch, tag or commit")
    p.add_argument("--prediction", choices=("epsilon", "velocity", "x"), default=None,
                   help="what the weights predict, when the source does not record it (default: the layout's)")
    p.add_argument("--text-len", type=int, default=None, help="caption tokens the model reads (PixArt, reference)")
    p.add_argument("--input-size", type=int, default=None, help="the reference: its latent side (default 32)")
    p.add_argument("--heads", type=int, default=None, help="PixArt-original: attention heads (default dim / 72)")
    p.add_argument("--text-encoder", default=None, help="hub id (or 'bundled') to record as the text encoder")
    p.add_argument("--tokenizer", default=None, help="hub id (or 'bundled') to record as the tokenizer")
    p.add_argument("--vae", default=None, help="hub id to record as the VAE (its vae/ subfolder)")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    from core.checkpoint import save_atomic

    args = parse_args(argv)
    if args.out.exists() and not args.force:
        print(f"ERROR: --out {args.out} exists; pass --force to replace it", file=sys.stderr)
        raise SystemExit(2)
    options = ImportOptions(weights=args.weights, revision=args.revision, prediction=args.prediction,
                            text_len=args.text_len, input_size=args.input_size, heads=args.heads,
                            text_encoder=args.text_encoder, tokenizer=args.tokenizer, vae=args.vae)
    try:
        imported = import_weights(args.source, options)
    except (ImportSourceError, ValueError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(imported.checkpoint(), args.out)
    meta = imported.metadata
    print(f"imported {args.source} ({meta['imported']['layout']}) as {meta['name']}: "
          f"{meta['parameters']:,} parameters, predicts {meta['prediction']}")
    for note in imported.notes:
        print(f"  note: {note}")
    if meta["prediction"] not in ("velocity", "x"):
        print(f"  {meta['prediction']}-trained: the sampler refuses it until it is fine-tuned to velocity "
              f"(train.init_from={args.out} train.prediction=velocity)")
    print(f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
