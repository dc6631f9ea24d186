"""The tokenizer: captions to fixed-length token ids and masks, and its portable identity.

A tokenizer is recorded (in shard manifests and checkpoints) by an identity that means the same on every machine,
never by a local path (data/README.md, "Tokenizer identity"): `id` is the bundled MiniLM's package id, a hub id
with its `revision`, or `sha256:<hash of its files>` for a local folder; `sha256` hashes its files; plus the
vocabulary size and max length. `check_tokenizer` compares a recorded identity with a loaded tokenizer.
"""

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from core.hub import (  # noqa: F401 (BUNDLED_* and the source helpers are part of the tokenizer's API)
    BUNDLED_NAME,
    BUNDLED_TOKENIZER,
    UnsafeSourceError,
    checked_hub_id,
    checked_revision,
    default_tokenizer_path,
    is_bundled,
    is_hub_id,
    recorded_tokenizer_source,
)
from core.identity import source_identity

TOKENIZER_FILES = (
    "added_tokens.json", "merges.txt", "sentencepiece.bpe.model", "special_tokens_map.json", "spiece.model",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
)
"""The files that decide a tokenizer's ids: those present are hashed for its identity (data/README.md)."""


def tokenizer_identity(
    name_or_path: str | Path, max_length: int, vocab_size: int, revision: str | None = None
) -> dict[str, Any]:
    """The portable record of a tokenizer (data/README.md, "Tokenizer identity"), never a local path: core/identity.py's
    record of its TOKENIZER_FILES, with its max length and vocabulary size."""
    ident = source_identity(str(name_or_path), "tokenizer", TOKENIZER_FILES, TOKENIZER_FILES, revision)
    return ident | dict(max_length=int(max_length), vocab_size=int(vocab_size))


def _portable(ident: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer record in today's form: older ones hold a path in `id` (the bundled MiniLM's is recognised)."""
    ident = dict(ident)
    if is_bundled(ident.get("id")):
        ident["id"] = BUNDLED_TOKENIZER
    return ident


def describe_tokenizer(ident: dict[str, Any]) -> str:
    """A tokenizer record in a few words, for messages."""
    parts = [f"{ident.get('id')!r}"]
    parts += [f"revision {ident['revision']}"] if ident.get("revision") else []
    parts += [f"sha256 {ident['sha256'][:12]}"] if ident.get("sha256") else []
    parts += [f"{key} {ident[key]}" for key in ("vocab_size", "max_length") if ident.get(key) is not None]
    return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def check_tokenizer(recorded: dict[str, Any], configured: "TextTokenizer | dict[str, Any]") -> None:
    """ValueError naming both when `configured` (a loaded TextTokenizer or its record) is not the tokenizer
    `recorded` (a manifest's or checkpoint's `tokenizer`) names.

    Same files (sha256) means the same tokenizer, whatever the ids; without a hash on both sides, the same portable
    id and revision do. The vocabulary size and the max length must match in any case. A record older than the
    hash whose id was a local path can only be checked by those two.
    """
    rec = _portable(recorded)
    cfg = _portable(configured.info if isinstance(configured, TextTokenizer) else configured)
    if rec.get("sha256") and cfg.get("sha256"):
        same = rec["sha256"] == cfg["sha256"]
    elif is_hub_id(str(rec.get("id"))) or rec.get("id") == BUNDLED_TOKENIZER:
        revisions = rec.get("revision"), cfg.get("revision")
        same = rec.get("id") == cfg.get("id") and (None in revisions or revisions[0] == revisions[1])
    else:
        same = True
    for key in ("vocab_size", "max_length"):
        if rec.get(key) is not None and cfg.get(key) is not None:
            same = same and int(rec[key]) == int(cfg[key])
    if not same:
        raise ValueError(
            f"tokenizer mismatch: the tokens were made with {describe_tokenizer(rec)}, but the tokenizer here is "
            f"{describe_tokenizer(cfg)}"
        )


class TextTokenizer:
    """A `transformers` tokenizer that pads and truncates to a fixed length: int32 ids and a bool mask.

    `name_or_path`: a local folder, a hub id (`revision` optional, or written `owner/name@revision`), or
    BUNDLED_TOKENIZER. `info` is its portable identity (tokenizer_identity), what manifests record.
    """

    def __init__(self, name_or_path: str | Path, max_length: int, revision: str | None = None):
        from transformers import AutoTokenizer

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        source = str(name_or_path)
        if source.startswith("sha256:"):
            raise ValueError(f"tokenizer {source!r} is known only by the hash of its files: pass its folder")
        if "@" in source and revision is None and not Path(source).exists() and is_hub_id(source.split("@")[0]):
            source, revision = source.split("@", 1)
        if is_bundled(source):
            source = default_tokenizer_path()
        try:
            # trust_remote_code=False: a tokenizer_config.json's auto_map never imports its module.
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        except OSError as err:
            raise OSError(f"cannot load tokenizer {source!r} ({err}); without internet, pass a local folder") from err
        if self.tokenizer.pad_token is None:
            # Decoder-only tokenizers often ship without one; padded positions are masked out anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        # len() counts added special tokens too; vocab_size alone can be smaller than the largest id.
        self.vocab_size = len(self.tokenizer)
        self.identity = tokenizer_identity(source, max_length, self.vocab_size, revision)
        self.id = self.identity["id"]

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.identity)

    def __call__(self, texts: list[str]) -> tuple[Int[Tensor, "b l"], Bool[Tensor, "b l"]]:
        out = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return out["input_ids"].to(torch.int32), out["attention_mask"].bool()
