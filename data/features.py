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

The encoder is recorded by its portable identity (core/text_encoder.py: `encoder_identity`, the same record a
checkpoint keeps of the encoder it trained with): `id` (the bundled MiniLM's package id, a hub id, or
`sha256:<hash>` for a local folder), `revision` (a hub commit), `sha256` (over its weight and config files,
`weights_sha256`) and `subfolder`; `check_encoder` compares a recorded identity with a configured encoder without
loading its weights.
"""

from typing import Any

from core.text_encoder import (  # noqa: F401 (the identity lives with the encoder; data's callers import it here)
    BUNDLED_ENCODER,
    WEIGHT_PATTERNS,
    check_encoder,
    describe_encoder,
    encoder_identity,
    same_encoder,
    weights_sha256,
)

FEATURE_DTYPE = "bfloat16"
"""What features are stored as: the encoder's own dtype on a GPU, half the bytes of float32."""
FEATURE_KEYS = {"text_features": ("attn_mask", "text_feature_offsets"),
                "short_text_features": ("short_attn_mask", "short_text_feature_offsets")}
"""Feature key -> (the mask whose True positions it holds, its offsets key)."""
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
