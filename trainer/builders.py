"""Everything a stage builds before its loop starts, from the config and the data's manifest.

The manifest is the source of truth for what the data holds (latent shape, VAE, labels or captions,
tokenizer), so the model's input fields are filled from it and every configured value that disagrees with
it is an error naming the key, before any compute is spent.
"""

import functools
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from core import checkpoint
from core.checkpoint import CheckpointMetadata
from core.conditioning import ClassConditioning, FeatureConditioning, TextConditioning
from data.shards import DatasetSpec, ShardError, read_manifest
from models.config import ModelConfig, default_conditioning
from models.conversion import change_patch
from models.registry import model_config
from trainer.errors import ConfigError, MissingInputError
from trainer.precision import text_pad_multiple

log = logging.getLogger(__name__)

# What makes two checkpoints the same network: a resume across any of these would load the wrong weights.
ARCHITECTURE_FIELDS = ("family", "conditioning", "dim", "depth", "heads", "patch", "in_channels", "mlp_ratio",
                       "cond_dim", "num_classes", "text_dim", "text_len", "num_registers", "pos_embed", "rope",
                       "pixel_dim", "pixel_depth", "qk_norm", "activation", "caption_projection")

def model_conditioning(cfg: DictConfig) -> str:
    """class or text: model.conditioning, or the family's default (models/config.py)."""
    return cfg.model.conditioning or default_conditioning(cfg.model.family)


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Samples per rank per forward: train.batch_size over the ranks and train.grad_accum (the trainer and the
    memory planner split it the same way)."""
    if grad_accum < 1 or batch_size % (world_size * grad_accum):
        raise ConfigError(
            f"train.batch_size={batch_size} must split evenly over {world_size} ranks x train.grad_accum="
            f"{grad_accum} micro-batches"
        )
    return batch_size // (world_size * grad_accum)


def read_data_spec(cfg: DictConfig) -> DatasetSpec:
    path = Path(cfg.data.path)
    try:
        return read_manifest(path)[1]
    except ShardError as err:
        embedded = "embedded" in str(path) or "outputs/data" in str(path)
        hint = " (build the embedded data with `make demo` or `make data`)" if embedded else ""
        raise MissingInputError(f"data.path={str(path)!r}: {err}{hint}") from err


def check_vae(cfg: DictConfig, spec: DatasetSpec, data_path: str) -> None:
    """The configured VAE must be the kind the shards were encoded with."""
    data_identity = spec.vae.get("id") == "identity"
    if data_identity != (cfg.vae.kind == "identity"):
        raise ConfigError(
            f"vae={cfg.vae.kind} but {data_path}/manifest.json records vae id {spec.vae.get('id')!r}: "
            f"pick vae={'identity' if data_identity else 'sd3'} (or the data that matches)"
        )


def build_conditioning(cfg: DictConfig, spec: DatasetSpec, device: torch.device, model_dtype):
    """ClassConditioning for labels data; for captions FeatureConditioning when the shards' stored encoder states
    are used (no encoder loaded for training), else TextConditioning with the frozen encoder."""
    wants_text = model_conditioning(cfg) == "text"
    if wants_text != (spec.kind == "text"):
        raise ConfigError(
            f"model.family={cfg.model.family} (conditioning={model_conditioning(cfg)}) needs "
            f"{'captions' if wants_text else 'class labels'} but data.path={cfg.data.path!r} holds "
            f"kind={spec.kind!r} records"
        )
    t = cfg.train
    if spec.kind == "labels":
        return ClassConditioning(spec.num_classes, spec.class_names, t.label_dropout)

    from core.text_encoder import FrozenTextEncoder

    enc_cfg = OmegaConf.to_container(cfg.text_encoder, resolve=True)
    if int(enc_cfg["max_length"]) != int(spec.tokenizer["max_length"]):
        raise ConfigError(
            f"text_encoder.max_length={enc_cfg['max_length']} but the shards in {cfg.data.path} were tokenized to "
            f"{spec.tokenizer['max_length']} tokens; set text_encoder.max_length={spec.tokenizer['max_length']}"
        )
    tokenizer = configured_tokenizer(cfg, spec)
    if uses_text_features(cfg, spec):
        check_feature_encoder(cfg, spec, enc_cfg)
        # Previews (rank 0 only) encode their prompts with it, on the CPU, and drop it again.
        load = functools.partial(FrozenTextEncoder.from_config, enc_cfg, device="cpu")
        return FeatureConditioning(spec.text_features, spec.tokenizer, t.caption_dropout, model_dtype, tokenizer,
                                   load)
    encoder = FrozenTextEncoder.from_config(enc_cfg, device=device)
    vocab = encoder.encoder.get_input_embeddings().num_embeddings
    if int(spec.tokenizer["vocab_size"]) > vocab:
        raise ConfigError(
            f"the shards' tokenizer {spec.tokenizer['id']!r} has {spec.tokenizer['vocab_size']} ids but text encoder "
            f"{encoder.name!r} embeds {vocab}: the tokens were made for another encoder"
        )
    return TextConditioning(encoder, spec.tokenizer, t.caption_dropout, int(t.text_cache), model_dtype, tokenizer)


def uses_text_features(cfg: DictConfig, spec: DatasetSpec) -> bool:
    """data.text_features: null uses the shards' stored states when they hold them, true requires them, false
    encodes the tokens with the configured encoder."""
    wanted = cfg.data.text_features
    if wanted and spec.text_features is None:
        raise ConfigError(
            f"data.text_features=true but data.path={cfg.data.path!r} holds no text features; build the shards with "
            "data/make_shards.py --text-features, or set data.text_features=null"
        )
    return spec.text_features is not None and wanted is not False


def check_feature_encoder(cfg: DictConfig, spec: DatasetSpec, enc_cfg: dict[str, Any]) -> None:
    """The configured encoder must be the one that made the stored features (by its weights' hash, or its hub id
    and revision; data/features.py), and as wide: checked from its files, without loading it."""
    from data.features import check_encoder, encoder_identity

    source = enc_cfg["name_or_path"] or "the bundled MiniLM"
    try:  # the schema has no revision: the encoder is loaded at the hub's default, and so identified
        configured = encoder_identity(enc_cfg["name_or_path"], enc_cfg["subfolder"])
        check_encoder(spec.text_features["encoder"], configured, str(cfg.data.path))
    except ValueError as err:
        raise ConfigError(
            f"text_encoder.name_or_path={source!r}: {err}. Configure the encoder that made the features, or set "
            "data.text_features=false to encode the tokens with this one"
        ) from err
    width = spec.text_features["width"]
    if int(enc_cfg["hidden_size"]) != int(width):
        raise ConfigError(f"text_encoder.hidden_size={enc_cfg['hidden_size']} but the stored text features in "
                          f"{cfg.data.path} are {width} wide; set text_encoder.hidden_size={width}")


def loader_options(cfg: DictConfig, conditioning) -> dict[str, Any]:
    """What the loader reads besides the records' own keys: the stored text features when the conditioning uses
    them, and data.buckets (checked against the shards' buckets)."""
    buckets = cfg.data.buckets
    if buckets is not None:
        buckets = list(buckets)
        have = list(read_data_spec(cfg).buckets or [])
        unknown = [b for b in buckets if b not in have]
        if unknown or not buckets:
            listed = f"the buckets {', '.join(have)}" if have else "no buckets (null trains on all its records)"
            raise ConfigError(f"data.buckets={buckets}: {cfg.data.path} holds {listed}")
    return dict(text_features=isinstance(conditioning, FeatureConditioning), buckets=buckets)


def configured_tokenizer(cfg: DictConfig, spec: DatasetSpec):
    """The text encoder's tokenizer (text_encoder.tokenizer, or its name_or_path; null: the bundled MiniLM),
    which must be the one the shards were tokenized with: token ids from another vocabulary would train silently."""
    from core.tokenizer import BUNDLED_TOKENIZER, TextTokenizer, check_tokenizer

    enc = cfg.text_encoder
    source = enc.tokenizer or enc.name_or_path or BUNDLED_TOKENIZER
    try:
        tokenizer = TextTokenizer(source, int(spec.tokenizer["max_length"]))
        check_tokenizer(spec.tokenizer, tokenizer)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"text_encoder (tokenizer {source!r}) does not fit data.path={cfg.data.path!r}: {err}. Pick the "
            "text_encoder the shards were made for, or re-tokenize the data"
        ) from err
    return tokenizer


def resolve_checkpoint(path: str | Path, what: str) -> Path:
    """A checkpoint (file or sharded folder), or a run's out_dir / checkpoints dir (then its newest checkpoint)."""
    try:
        return checkpoint.resolve(path, what)
    except FileNotFoundError as err:
        raise MissingInputError(
            f"{err} (train the previous stage first; `make demo` runs the embedded chain; {what}=null starts from a "
            "fresh initialisation)"
        ) from None


def resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    """train.resume: 'auto' (newest checkpoint in out_dir, if any), 'never', or a checkpoint path."""
    if resume == "never":
        return None
    if resume == "auto":
        return checkpoint.newest(ckpt_dir)
    path = Path(resume)
    if not (path.is_file() or checkpoint.is_sharded(path)):
        raise MissingInputError(f"train.resume={resume!r}: not 'auto', 'never' or an existing checkpoint file (or a "
                                "sharded step_*.dcp folder)")
    return path


def read_resume_checkpoint(path: Path | None, cfg: DictConfig) -> dict[str, Any] | None:
    """The checkpoint a run resumes from, loaded; an unreadable one is an error that offers the newest readable
    checkpoint beside it (a damaged newest file must not silently send a run back to an older state)."""
    if path is None:
        return None
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as err:
        raise unreadable_resume(path, cfg, err) from None
    for key in ("model", "ema", "optimizer", "scheduler", "step", "history", "loader", "rng", "metadata"):
        if key not in state:
            raise checkpoint.CheckpointError(
                f"train.resume: {path} has no '{key}': not a training checkpoint of this repository (an initialisation "
                "from reparameterize.py? start from it with train.init_from)"
            )
    return state


def unreadable_resume(path: Path, cfg: DictConfig, err: checkpoint.CheckpointError) -> checkpoint.CheckpointError:
    """The error for a resume checkpoint that cannot be read, whether opening it failed or (a sharded one damaged
    where its sizes do not show it) reading its tensors did: it offers the newest readable checkpoint beside it."""
    older = [p for p in checkpoint.list_checkpoints(path.parent) if p != path]
    good = next((p for p in reversed(older) if _loads(p)), None)
    offer = (f"; the newest readable one is {good}: resume from it with train.resume={good}, or move {path} "
             "away" if good else "; no other checkpoint there loads: train.resume=never starts over")
    return checkpoint.CheckpointError(f"train.resume={cfg.train.resume}: {err}{offer}")


def _loads(path: Path) -> bool:
    try:
        checkpoint.load(path)
        return True
    except checkpoint.CheckpointError:
        return False


def check_resumable(path: Path, state: dict[str, Any], cfg: DictConfig, model_config: ModelConfig) -> None:
    """Refuse to resume a checkpoint of another stage or another network, or past this run's max_steps."""
    record = CheckpointMetadata.parse(state["metadata"], f"train.resume: {path}")
    if record.stage is not None and int(record.stage) != int(cfg.stage):
        raise ConfigError(
            f"train.resume: {path} is a Stage {record.stage} checkpoint, but this is Stage {cfg.stage}; to start "
            f"Stage {cfg.stage} from its weights use train.init_from={path} (and a new train.out_dir)"
        )
    saved, ours = record.model, model_config.to_dict()
    differ = [f"{k}: {saved.get(k)!r} in the checkpoint, {ours.get(k)!r} here" for k in ARCHITECTURE_FIELDS
              if k in saved and saved.get(k) != ours.get(k)]
    if differ:
        raise ConfigError(
            f"train.resume: {path} holds a {record.name} that differs from this run's "
            f"{model_config.name}: " + "; ".join(differ) + ". Resume with the checkpoint's model settings, or "
            "start a new run (train.out_dir=..., or train.resume=never)"
        )
    if int(state["step"]) > int(cfg.train.max_steps):
        raise ConfigError(
            f"train.resume: {path} is at step {state['step']}, past train.max_steps={cfg.train.max_steps}: nothing to "
            f"train. Raise train.max_steps, or train.resume=never to start over"
        )


def warn_if_batch_exceeds_data(cfg: DictConfig, dataset, world_size: int) -> None:
    """A global batch larger than an epoch repeats records within a step; say so once."""
    if cfg.train.batch_size > dataset.num_records:
        log.warning("train.batch_size=%d is larger than %s's %d records: every step repeats records",
                    cfg.train.batch_size, cfg.data.path, dataset.num_records)


def model_input_size(height: int, width: int, patch: int) -> int:
    """The model's input_size for latents of height x width. Non-square latents (one bucket, or buckets: then the
    manifest's latent_shape is the resolution's square) take the side of the square with their token count as the
    model's default size; positions are per axis anyway (models/embeddings)."""
    return height if height == width else max(patch, round(math.sqrt(height * width) / patch) * patch)


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
    for _, bh, bw in spec.latent_shapes():  # a bucket the patch does not tile could not be trained on
        if bh % m.patch or bw % m.patch:
            raise ConfigError(f"{cfg.data.path}: latents of {bh}x{bw} are not a multiple of model.patch={m.patch}")
    derived: dict[str, Any] = dict(in_channels=c, input_size=model_input_size(h, w, m.patch),
                                   conditioning=model_conditioning(cfg))
    if isinstance(conditioning, ClassConditioning):
        derived["num_classes"] = conditioning.num_classes
    else:
        derived |= dict(text_dim=conditioning.hidden_size, text_len=conditioning.max_length)
    for key, value in derived.items():
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"model.overrides.{key}={overrides[key]} but the data/text encoder give {value}")
    fields = derived | carried_fields(init_model, m.family, set(derived) | set(overrides)) | overrides
    if init_model is not None and "base_grid" not in overrides:
        fields["base_grid"] = init_model.get("base_grid")
    if cfg.precision.fp8 and "text_pad_multiple" not in overrides:
        # FP8 GEMMs need batch x rows divisible by the recipe's multiple (16, MXFP8 32): padding the caption keys
        # (masked, so the output is the same) makes the text-side layers pass at any micro-batch (trainer/precision.py).
        fields["text_pad_multiple"] = text_pad_multiple(cfg.precision.fp8_recipe)
    try:
        return model_config(**dict(family=m.family, size=m.size, patch=m.patch) | fields)
    except ValueError as err:  # a value the family cannot take (pixart's cond_dim ...): the message names the key
        raise ConfigError(f"model={m.family}: {err}") from None


FUNCTION_FIELDS = ("time_scale", "time_max_period", "activation", "caption_projection", "interpolation_scale",
                   "qk_norm", "pos_embed", "rope", "rope_theta")
"""What a stage takes from the checkpoint it starts from or resumes (same family), unless model.overrides sets it: the
fields that make its weights compute what they did, which no stage should change by default. The reference's ccDiT
(raw-t sinusoid: time_scale, time_max_period) or an imported PixArt (interpolation_scale) then needs no override."""
SHAPE_FIELDS = ("dim", "depth", "heads", "mlp_ratio", "cond_dim", "num_registers", "pixel_dim", "pixel_depth")
"""Taken too from an imported checkpoint (app/import_weights.py), whose size need not be a named one."""


def carried_fields(init_model: dict[str, Any] | None, family: str, fixed: set[str]) -> dict[str, Any]:
    """The FUNCTION_FIELDS (and for an import the SHAPE_FIELDS) of the checkpoint a stage starts from, when it is the
    same family, except the `fixed` ones (from the data or the overrides)."""
    if not init_model or init_model.get("family") != family:
        return {}
    imported = bool((init_model.get("extra") or {}).get("imported_from"))
    names = FUNCTION_FIELDS + (SHAPE_FIELDS if imported else ())
    return {k: init_model[k] for k in names if k in init_model and k not in fixed}


def read_init_checkpoint(cfg: DictConfig) -> tuple[Path, dict[str, Any]] | None:
    """train.init_from, loaded once (an XL checkpoint is several GB): (its path, its contents) or None. A source of
    another layout (a Hub id, a diffusers folder, a .safetensors file, PixArt's or the reference's .pth) is imported
    in memory, as `python -m app.import_weights` would write it."""
    if cfg.train.init_from is None:
        return None
    from app.import_weights import ImportSourceError, import_checkpoint, is_importable

    source = str(cfg.train.init_from)
    if is_importable(source):
        try:
            imported = import_checkpoint(source)
        except ImportSourceError as err:
            raise ConfigError(f"train.init_from={source!r}: {err}") from None
        log.info("train.init_from=%s: imported (%s)", source, imported["metadata"]["imported"]["layout"])
        return Path(source), imported
    src = resolve_checkpoint(cfg.train.init_from, "train.init_from")
    state = checkpoint.load(src)
    try:
        init_record(src, state).check_not_adapter(f"train.init_from={str(src)!r}")
    except checkpoint.CheckpointError as err:
        raise ConfigError(str(err)) from None
    check_init_stage(cfg, src, state)
    return src, state


def init_record(src: Path, state: dict[str, Any]) -> CheckpointMetadata:
    """The metadata record of the checkpoint a stage starts from (CheckpointError naming it when it has none)."""
    return CheckpointMetadata.parse(state.get("metadata"), f"train.init_from={str(src)!r}")


def check_init_stage(cfg: DictConfig, src: Path, state: dict[str, Any]) -> None:
    """train.init_from must hold weights of the stage `starts_from` names, or of this stage (reparameterize.py's
    conversion for it, or a restart of it), when the config names one and the checkpoint records its stage."""
    recorded = init_record(src, state).stage
    if cfg.starts_from is None or recorded is None or int(recorded) in (int(cfg.starts_from), int(cfg.stage)):
        return
    raise ConfigError(
        f"train.init_from={str(src)!r} holds Stage {recorded} weights, but Stage {cfg.stage} starts from Stage "
        f"{cfg.starts_from} (starts_from={cfg.starts_from}): point train.init_from at a Stage {cfg.starts_from} "
        f"run, or set starts_from={recorded} (starts_from=null skips this check)"
    )


def _to_patch(weights: dict[str, Any], record: CheckpointMetadata, target: ModelConfig, src: Path) -> dict[str, Any]:
    """The weights at the model's patch size: a stage whose config names another patch than the checkpoint it
    starts from (the embedded Stages 4-5 grow it with the image, keeping the 8 x 8 token grid) gets them resampled
    by models/conversion.py:change_patch; the same patch, or another family, passes them through unchanged."""
    if not record.model or record.family != target.family or record.model.get("patch") in (None, target.patch):
        return weights
    try:
        return change_patch(weights, record.model_config, target.patch)[1]
    except ValueError as err:
        raise ConfigError(f"train.init_from={str(src)!r}: model.patch={target.patch}: {err}") from None


def apply_initial_weights(model: torch.nn.Module, src: Path, state: dict[str, Any], which: str) -> None:
    """Load the `ema` or `raw` weights of a checkpoint into `model`; a mismatch names both sides."""
    key = checkpoint.WEIGHTS[which]
    weights = state.get(key)
    if weights is None:
        raise ConfigError(f"train.init_from={str(src)!r} holds no '{key}' weights")
    # Plain nn.Linear layout: an FP8-trained checkpoint's TE scaling state (older ones kept it inline) is dropped.
    weights = checkpoint.split_extra_state(weights)[0]
    weights = _to_patch(weights, init_record(src, state), model.config, src)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        family = init_record(src, state).family
        hint = (" (Stage 1 -> 2 needs `reparameterize.py stage1-to-stage2` first)"
                if family != model.config.family and model.config.family == "mmdit" else "")
        raise ConfigError(
            f"train.init_from={str(src)!r} ({family or 'unknown model'}) does not fit {model.config.name}: missing "
            f"{missing[:5]}, unexpected {unexpected[:5]}{hint}"
        )
    log.info("initialised from %s (%s weights)", src, which)
