"""Everything a stage builds before its loop starts, from the config and the data's manifest.

The manifest is the source of truth for what the data holds (latent shape, VAE, labels or captions,
tokenizer), so the model's input fields are filled from it and every configured value that disagrees with
it is an error naming the key, before any compute is spent.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from data.shards import DatasetSpec, ShardError, read_manifest
from models import ModelConfig, model_config
from models.config import default_conditioning
from trainer import checkpoint
from trainer.conditioning import ClassConditioning, TextConditioning

log = logging.getLogger(__name__)



def model_conditioning(cfg: DictConfig) -> str:
    """class or text: model.conditioning, or the family's default (models/config.py)."""
    return cfg.model.get("conditioning") or default_conditioning(cfg.model.family)


def read_data_spec(cfg: DictConfig) -> DatasetSpec:
    path = Path(cfg.data.path)
    try:
        return read_manifest(path)[1]
    except ShardError as err:
        embedded = "embedded" in str(path) or "outputs/data" in str(path)
        hint = " (build the embedded data with `make demo` or `make data`)" if embedded else ""
        raise FileNotFoundError(f"data.path={str(path)!r}: {err}{hint}") from err


def check_vae(cfg: DictConfig, spec: DatasetSpec, data_path: str) -> None:
    """The configured VAE must be the kind the shards were encoded with."""
    data_identity = spec.vae.get("id") == "identity"
    if data_identity != (cfg.vae.kind == "identity"):
        raise ValueError(
            f"vae={cfg.vae.kind} but {data_path}/manifest.json records vae id {spec.vae.get('id')!r}: "
            f"pick vae={'identity' if data_identity else 'sd3'} (or the data that matches)"
        )


def build_conditioning(cfg: DictConfig, spec: DatasetSpec, device: torch.device, model_dtype):
    """ClassConditioning for labels data, TextConditioning (with the frozen encoder) for captions."""
    wants_text = model_conditioning(cfg) == "text"
    if wants_text != (spec.kind == "text"):
        raise ValueError(
            f"model.family={cfg.model.family} (conditioning={model_conditioning(cfg)}) needs "
            f"{'captions' if wants_text else 'class labels'} but data.path={cfg.data.path!r} holds "
            f"kind={spec.kind!r} records"
        )
    t = cfg.train
    if spec.kind == "labels":
        return ClassConditioning(spec.num_classes, spec.class_names, t.label_dropout)

    from models.text_encoder import FrozenTextEncoder

    enc_cfg = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    if int(enc_cfg["max_length"]) != int(spec.tokenizer["max_length"]):
        raise ValueError(
            f"text_encoder.max_length={enc_cfg['max_length']} but the shards in {cfg.data.path} were tokenized to "
            f"{spec.tokenizer['max_length']} tokens; set text_encoder.max_length={spec.tokenizer['max_length']}"
        )
    encoder = FrozenTextEncoder.from_config(enc_cfg, device=device)
    vocab = encoder.encoder.get_input_embeddings().num_embeddings
    if int(spec.tokenizer["vocab_size"]) > vocab:
        raise ValueError(
            f"the shards' tokenizer {spec.tokenizer['id']!r} has {spec.tokenizer['vocab_size']} ids but text encoder "
            f"{encoder.name!r} embeds {vocab}: the tokens were made for another encoder"
        )
    return TextConditioning(encoder, spec.tokenizer, t.caption_dropout, int(t.text_cache), model_dtype)


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A checkpoint file, or a run's out_dir / checkpoints dir (then its newest checkpoint)."""
    p = Path(path)
    if p.is_file():
        return p
    for folder in (p / "checkpoints", p):
        found = checkpoint.list_checkpoints(folder)
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"{what}={str(path)!r}: not a checkpoint file nor a folder holding step_*.pt checkpoints (train the previous "
        f"stage first; `make demo` runs the embedded chain; {what}=null starts from a fresh initialisation)"
    )


def build_model_config(
    cfg: DictConfig, spec: DatasetSpec, conditioning, init_model: dict[str, Any] | None
) -> ModelConfig:
    """The model config: the named size, the input fields from the data and encoder, the config's overrides.

    An override that contradicts the data is an error. `base_grid` is carried from the checkpoint the stage
    starts from, so a stage at a higher resolution interpolates the positions the previous one learned.
    """
    m = cfg.model
    overrides = OmegaConf.to_container(m.overrides, resolve=True) or {}
    c, h, w = spec.latent_shape
    if h != w:
        raise ValueError(f"{cfg.data.path}: latents are {h}x{w}; the models take square inputs")
    derived: dict[str, Any] = dict(in_channels=c, input_size=h, conditioning=model_conditioning(cfg))
    if isinstance(conditioning, ClassConditioning):
        derived["num_classes"] = conditioning.num_classes
    else:
        derived |= dict(text_dim=conditioning.encoder.hidden_size, text_len=conditioning.max_length)
    for key, value in derived.items():
        if key in overrides and overrides[key] != value:
            raise ValueError(f"model.overrides.{key}={overrides[key]} but the data/text encoder give {value}")
    fields = derived | overrides
    if init_model is not None and "base_grid" not in overrides:
        fields["base_grid"] = init_model.get("base_grid")
    return model_config(f"{m.family}-{m.size}/{m.patch}", **fields)


def read_init_checkpoint(cfg: DictConfig) -> tuple[Path, dict[str, Any]] | None:
    """train.init_from, loaded once (an XL checkpoint is several GB): (its path, its contents) or None."""
    if cfg.train.init_from is None:
        return None
    src = resolve_checkpoint(cfg.train.init_from, "train.init_from")
    return src, checkpoint.load(src)


def apply_initial_weights(model: torch.nn.Module, src: Path, state: dict[str, Any], which: str) -> None:
    """Load the `ema` or `raw` weights of a checkpoint into `model`; a mismatch names both sides."""
    key = {"ema": "ema", "raw": "model"}.get(which)
    if key is None:
        raise ValueError(f"train.init_weights={which!r}: expected ema or raw")
    weights = state.get(key)
    if weights is None:
        raise ValueError(f"train.init_from={str(src)!r} holds no '{key}' weights")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"train.init_from={str(src)!r} does not fit {model.config.name}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} (Stage 1 -> 2 needs `reparameterize.py stage1-to-stage2` first)"
        )
    log.info("initialised from %s (%s weights)", src, which)
