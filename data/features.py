"""Precomputed text features: the frozen encoder's last hidden states stored in the shards, and its identity.

PixArt-alpha and SANA encode every caption once, before training, instead of on every micro-batch of every rank
[chen2023pixartalpha, xie2024sana]: a T5-XXL encoding of a 120-token caption costs about as much as the DiT's
whole training step at 256 px, and the encoder's weights would sit in every GPU's memory. With
`data/make_shards.py --text-features` the shards hold, besides the tokens, the states of the real tokens
of each caption (long and short) in bfloat16, and the trainer reads them instead of loading the encoder.

Layout (data/README.md): `text_features` [T, D] holds the states of every record's real tokens, record after
record, in the order of their True mask positions; `text_feature_offsets` [N + 1] (int64) says where each record's
rows start, so record i has rows offsets[i]:offsets[i + 1], and offsets[i + 1] - offsets[i] = attn_mask[i].sum().
The loader scatters them back to the mask's positions of a zero [B, L, D] batch: the encoder's own output, which is
zero at padded positions (core/text_encoder.py). A compact layout rather than one padded per shard to its longest
caption: captions vary in length (VLM captions from a dozen to the full 120 tokens), and padding a shard to its
longest would store up to max_length / mean length times the bytes; the offsets cost 8 bytes a record.

The encoder is recorded like the tokenizer (core/tokenizer.py), by a portable identity: `id` (the bundled MiniLM's
package id, a hub id, or `sha256:<hash>` for a local folder), `revision` (a hub commit), `sha256` (over its weight
and config files, WEIGHT_PATTERNS), `model_type` and `subfolder`; `check_encoder` compares a recorded identity
with a configured encoder without loading its weights.
"""

from pathlib import Path
from typing import Any

from core.hub import BUNDLED_TOKENIZER
from core.identity import source_identity

BUNDLED_ENCODER = BUNDLED_TOKENIZER
"""The bundled MiniLM's portable id: the package ships its tokenizer and its encoder together."""
FEATURE_DTYPE = "bfloat16"
"""What features are stored as: the encoder's own dtype on a GPU, half the bytes of float32."""
FEATURE_KEYS = {"text_features": ("attn_mask", "text_feature_offsets"),
                "short_text_features": ("short_attn_mask", "short_text_feature_offsets")}
"""Feature key -> (the mask whose True positions it holds, its offsets key)."""
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
"""The files that decide an encoder's output: those present are hashed for its identity."""


def encoder_identity(
    name_or_path: str | Path | None, subfolder: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The portable record of a text encoder (module docstring), never a local path; computed from its files
    without loading it (core/identity.py, hashing WEIGHT_PATTERNS). None is the bundled MiniLM."""
    text = str(name_or_path) if name_or_path is not None else BUNDLED_ENCODER
    ident = source_identity(text, "text encoder", WEIGHT_PATTERNS, ("config.json",), revision, subfolder)
    return ident | dict(subfolder=subfolder)


def describe_encoder(ident: dict[str, Any]) -> str:
    """An encoder record in a few words, for messages."""
    parts = [f"revision {ident['revision']}"] if ident.get("revision") else []
    parts += [f"sha256 {ident['sha256'][:12]}"] if ident.get("sha256") else []
    parts += [f"subfolder {ident['subfolder']}"] if ident.get("subfolder") else []
    return repr(ident.get("id")) + (f" ({', '.join(parts)})" if parts else "")


def same_encoder(recorded: dict[str, Any], configured: dict[str, Any]) -> bool:
    """Same weight files (sha256) means the same encoder whatever the ids; without a hash on both sides, the same
    id, subfolder and revision (a missing revision on either side matches any)."""
    if recorded.get("sha256") and configured.get("sha256"):
        return recorded["sha256"] == configured["sha256"]
    revisions = recorded.get("revision"), configured.get("revision")
    return (recorded.get("id") == configured.get("id") and recorded.get("subfolder") == configured.get("subfolder")
            and (None in revisions or revisions[0] == revisions[1]))


def check_encoder(recorded: dict[str, Any], configured: dict[str, Any], where: str) -> None:
    """ValueError naming both when the configured encoder's identity is not the one the features were made with."""
    if not same_encoder(recorded, configured):
        raise ValueError(f"the text features in {where} were made by the encoder {describe_encoder(recorded)}, but "
                         f"the configured one is {describe_encoder(configured)}")


def features_record(identity: dict[str, Any], width: int, max_length: int) -> dict[str, Any]:
    """What a manifest's `spec.text_features` holds."""
    return dict(encoder=identity, width=int(width), dtype=FEATURE_DTYPE, max_length=int(max_length), layout="compact")


def check_features_record(record: Any, tokenizer: dict[str, Any] | None) -> None:
    """ValueError naming the field when a manifest's `spec.text_features` is malformed."""
    if not isinstance(record, dict):
        raise ValueError(f"text_features must be an object (encoder, width, dtype, max_length, layout), got {record!r}")
    encoder = record.get("encoder")
    if not isinstance(encoder, dict) or not isinstance(encoder.get("id"), str):
        raise ValueError(f"text_features.encoder must be an identity with an id, got {encoder!r}")
    if not (encoder.get("sha256") or encoder.get("revision") or encoder["id"] == BUNDLED_ENCODER):
        raise ValueError(f"text_features.encoder {describe_encoder(encoder)} has neither a sha256 nor a revision: "
                         "nothing could tell another encoder of that name from it")
    width = record.get("width")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"text_features.width must be a positive integer, got {width!r}")
    if record.get("dtype") != FEATURE_DTYPE or record.get("layout") != "compact":
        raise ValueError(f"text_features: dtype {record.get('dtype')!r} / layout {record.get('layout')!r}; this "
                         f"version reads {FEATURE_DTYPE!r} / 'compact'")
    if tokenizer is not None and record.get("max_length") != tokenizer.get("max_length"):
        raise ValueError(f"text_features.max_length {record.get('max_length')!r} != the tokenizer's max_length "
                         f"{tokenizer.get('max_length')!r}")
