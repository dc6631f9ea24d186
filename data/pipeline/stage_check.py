"""What a training stage will accept, known before any image is read: `--for-stage N` composes configs/stageN.yaml
(with `--stage-override KEY=VALUE ...`, through Hydra's compose API as the trainer composes it) and the sharder
(data/make_shards.py) takes its defaults from it and refuses flags whose shards that stage would refuse after the
captioning hours were spent (trainer/builders.py runs the same comparisons against the manifest).

Compared: the kind of records (the model's conditioning), the tokenizer's identity and length, the text encoder
whose states are stored, whether the stage reads stored states, the image size, the buckets the stage names, the
latent space and whether the model's patch tiles every latent grid.

REFERENCE holds the defaults without `--for-stage`: the reference stages' (tests/test_shard_stage_check.py checks
them against configs/stage2.yaml as composed).
"""

from dataclasses import dataclass
from typing import Any

from core.hub import BUNDLED_TOKENIZER

HUB_SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"
REFERENCE = dict(tokenizer="google/t5gemma-xl-xl-ul2", max_length=120, image_size=256, vae="sd3", vae_path=HUB_SD3,
                 vae_subfolder="vae")
"""The reference text stages' tokenizer and length (configs/text_encoder/t5gemma.yaml), image size and VAE."""
LATENT_FACTOR = {"sd3": 8, "identity": 1}
"""Pixels per latent pixel of each latent space (core/vae.py)."""


@dataclass(frozen=True)
class StageNeeds:
    """What one composed stage config reads from its shards."""

    stage: int
    where: str
    """configs/stageN.yaml and the overrides, for messages."""
    kind: str
    """labels | text, from the model's conditioning."""
    tokenizer: str
    text_encoder: str | None
    text_encoder_subfolder: str | None
    max_length: int
    text_features: bool | None
    """data.text_features: true requires stored states, false ignores them, null uses them when present."""
    image_size: int | None
    buckets: list[str] | None
    vae: str
    vae_path: str | None
    vae_subfolder: str | None
    patch: int


def compose_stage(stage: int, overrides: list[str]) -> Any:
    """configs/stage<N>.yaml with `overrides`, as train_stage<N>.py composes it (the schema registered first)."""
    from hydra import compose, initialize_config_dir

    import trainer.config  # noqa: F401 (registers the schema that configs/base.yaml starts from)
    from trainer.cli import CONFIGS

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=f"stage{stage}", overrides=list(overrides))


def stage_needs(stage: int, overrides: list[str]) -> StageNeeds:
    from omegaconf import OmegaConf

    from models.config import default_conditioning

    cfg = compose_stage(stage, overrides)
    enc = cfg.text_encoder
    data = OmegaConf.to_container(cfg.data, resolve=False)  # data.path may be ??? before the shards exist
    conditioning = cfg.model.conditioning or default_conditioning(cfg.model.family)
    where = f"configs/stage{stage}.yaml" + (f" with {' '.join(overrides)}" if overrides else "")
    return StageNeeds(
        stage=stage, where=where, kind="labels" if conditioning == "class" else "text",
        tokenizer=enc.tokenizer or enc.name_or_path or BUNDLED_TOKENIZER,
        text_encoder=enc.name_or_path, text_encoder_subfolder=enc.subfolder,
        max_length=int(enc.max_length), text_features=data["text_features"], image_size=data["image_size"],
        buckets=list(data["buckets"]) if data["buckets"] else None, vae=cfg.vae.kind,
        vae_path=cfg.vae.name_or_path, vae_subfolder=cfg.vae.subfolder, patch=int(cfg.model.patch),
    )


def _same_tokenizer(a: str, b: str) -> bool:
    """The same tokenizer by its files' hash where both are at hand, else by id and revision (core/tokenizer.py's
    rule; vocabulary size and length are compared separately)."""
    from core.tokenizer import check_tokenizer, tokenizer_identity

    try:
        check_tokenizer(tokenizer_identity(a, 0, 0), tokenizer_identity(b, 0, 0))
    except ValueError:
        return False
    return True


def _same_encoder(a: str | None, a_sub: str | None, b: str | None, b_sub: str | None) -> bool:
    from data.features import encoder_identity, same_encoder

    try:
        return same_encoder(encoder_identity(a, a_sub), encoder_identity(b, b_sub))
    except ValueError:
        return False


@dataclass(frozen=True)
class ShardSettings:
    """What the sharder is about to write (its flags after defaults)."""

    kind: str
    tokenizer: str
    text_encoder: str | None
    text_encoder_subfolder: str | None
    max_length: int
    text_features: bool
    image_size: int
    buckets: list[tuple[int, int]] | None
    """(height, width) in pixels, or None for square crops of image_size."""
    vae: str


def mismatches(needs: StageNeeds, shards: ShardSettings) -> list[str]:
    """One phrase per setting the stage would refuse (or, for stored features it ignores, waste), naming the flag
    and the stage's key; empty when the stage takes these shards as they are."""
    out = []
    if shards.kind != needs.kind:
        out.append(f"--kind {shards.kind}: the stage's model ({needs.kind} conditioning) reads {needs.kind} records")
    if shards.vae != needs.vae:
        out.append(f"--vae {shards.vae}: the stage's vae.kind is {needs.vae!r}")
    if shards.image_size != (needs.image_size or shards.image_size):
        out.append(f"--image-size {shards.image_size}: the stage's data.image_size is {needs.image_size}")
    sizes = shards.buckets or [(shards.image_size, shards.image_size)]
    factor = LATENT_FACTOR.get(shards.vae, 1)
    if any((h // factor) % needs.patch or (w // factor) % needs.patch for h, w in sizes):
        out.append(f"--image-size/--buckets {sizes}: latents of {[(h // factor, w // factor) for h, w in sizes]} are "
                   f"not all tiled by the stage's model.patch {needs.patch}")
    if needs.buckets:
        have = {f"{h}x{w}" for h, w in shards.buckets or []}
        if missing := [b for b in needs.buckets if b not in have]:
            out.append(f"--buckets: the stage's data.buckets names {missing}, which these shards would not hold")
    if shards.kind == "text" and needs.kind == "text":
        if shards.max_length != needs.max_length:
            out.append(f"--max-length {shards.max_length}: the stage's text_encoder.max_length is {needs.max_length}")
        if not _same_tokenizer(shards.tokenizer, needs.tokenizer):
            out.append(f"--tokenizer {shards.tokenizer!r}: the stage's tokenizer (text_encoder.tokenizer, else "
                       f"text_encoder.name_or_path) is {needs.tokenizer!r}")
        if needs.text_features is True and not shards.text_features:
            out.append("no --text-features: the stage's data.text_features is true (it reads stored encoder states)")
        if needs.text_features is False and shards.text_features:
            out.append("--text-features: the stage's data.text_features is false (it would ignore the stored states)")
        if shards.text_features and not _same_encoder(shards.text_encoder, shards.text_encoder_subfolder,
                                                      needs.text_encoder, needs.text_encoder_subfolder):
            out.append(f"--text-encoder {shards.text_encoder or BUNDLED_TOKENIZER!r}: the stage's "
                       f"text_encoder.name_or_path is {needs.text_encoder or BUNDLED_TOKENIZER!r}")
    return out


def refusal(needs: StageNeeds, problems: list[str]) -> str:
    return (f"--for-stage {needs.stage}: {needs.where} would refuse these shards: " + "; ".join(problems)
            + ". Change the flags (or leave them out: they default to the stage's), or name the stage's own "
            "overrides with --stage-override KEY=VALUE")

