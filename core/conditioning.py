"""What turns a data batch into the model's conditioning: class labels (Stage 1) or captions (Stages 2-5), the
captions as tokens through the frozen encoder (TextConditioning) or as the encoder's states stored in the shards
(FeatureConditioning: no encoder in the training step).

Both drop a per-sample Bernoulli(p) fraction to the null condition, so one model learns p(x | c) and p(x)
and classifier-free guidance works at sampling time [ho2021cfg]. (The reference drew a fixed count with
replacement for labels and did not drop captions at all, so its Stage 2 could not be guided.)

The model is called as `model(x, t, **cond)`: `cond` is `{labels}` or `{text, text_mask}`.
"""

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from core.text_encoder import FrozenTextEncoder
from models.embeddings import null_label_for


def drop_mask(n: int, p: float, generator: torch.Generator) -> Bool[Tensor, " n"]:
    """Which samples lose their condition: independent Bernoulli(p) draws from the step's generator, on its device
    (the batch's conditions are moved there first; reading the draws back would make the step wait)."""
    if p <= 0:
        return torch.zeros(n, dtype=torch.bool, device=generator.device)
    return torch.rand(n, generator=generator, device=generator.device) < p


def to_device(tensor: Tensor, device) -> Tensor:
    """A batch tensor on `device`, copied without making the host wait (the loader pins its batches on CUDA)."""
    return tensor.to(device, non_blocking=True)


class ClassConditioning:
    """Labels -> `{labels}`; the null class is index num_classes (models/embeddings.py:LabelEmbedder)."""

    kind = "class"

    def __init__(self, num_classes: int, class_names: list[str] | None, dropout: float):
        self.num_classes, self.dropout = num_classes, dropout
        self.class_names = list(class_names) if class_names else [str(i) for i in range(num_classes)]

    @property
    def null_label(self) -> int:
        return null_label_for(self.num_classes)

    def from_batch(self, batch: dict[str, Tensor], generator: torch.Generator | None, device) -> dict[str, Tensor]:
        """The batch's labels, with dropout when `generator` (on `device`) is given (training) and none otherwise."""
        labels = to_device(batch["labels"], device).long()
        if generator is not None:
            labels = torch.where(drop_mask(len(labels), self.dropout, generator), self.null_label, labels)
        return dict(labels=labels)

    def from_labels(self, labels: list[int], device) -> dict[str, Tensor]:
        return dict(labels=torch.tensor(labels, dtype=torch.long, device=device))

    def null(self, n: int, device) -> dict[str, Tensor]:
        return dict(labels=torch.full((n,), self.null_label, dtype=torch.long, device=device))

    def metadata(self) -> dict[str, Any]:
        return dict(conditioning="class", num_classes=self.num_classes, class_names=self.class_names)


class TextConditioning:
    """Token ids -> `{text, text_mask}` through the frozen encoder; dropped captions are an all-False mask.

    `cache_size` > 0 keeps the encoder's output per distinct token row (an LRU of that many captions); a
    batch's misses are encoded in one call. Worth it when captions repeat (the embedded data: the loop is
    ~40% faster); real caption sets rarely repeat, so it is off by default. A resumed run starts with an empty
    cache, so its embeddings equal the uninterrupted run's only if the encoder's output for a row does not
    depend on the other rows of its batch. That holds for MiniLM on the CPU (tests/test_resume.py checks it,
    and the exact-resume test rests on it); with text_cache=0 every batch is encoded whole and a resumed run
    recomputes exactly what it saw in any case.
    """

    kind = "text"

    def __init__(
        self,
        encoder: FrozenTextEncoder,
        tokenizer_info: dict[str, Any],
        dropout: float,
        cache_size: int = 0,
        model_dtype: torch.dtype = torch.float32,
        tokenizer=None,
    ):
        """`tokenizer_info`: the tokenizer record of the data (core/tokenizer.py: tokenizer_identity);
        `tokenizer`: that tokenizer, loaded and checked against the record by the caller (for prompts)."""
        self.encoder, self.tokenizer_info, self.dropout = encoder, dict(tokenizer_info), dropout
        self.cache_size, self.model_dtype = cache_size, model_dtype
        self._cache: OrderedDict[bytes, Tensor] = OrderedDict()
        self._tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return int(self.tokenizer_info["max_length"])

    @property
    def hidden_size(self) -> int:
        """Width of the caption states the model reads (its text_dim)."""
        return self.encoder.hidden_size

    def _encode_cached(self, tokens: Int[Tensor, "b l"], mask: Bool[Tensor, "b l"]) -> Float[Tensor, "b l d"]:
        keys = [tok.numpy().tobytes() + m.numpy().tobytes() for tok, m in zip(tokens, mask, strict=True)]
        first: dict[bytes, int] = {}  # one encoder row per distinct missing caption, all in one batched call
        for i, key in enumerate(keys):
            if key not in self._cache:
                first.setdefault(key, i)
        if first:
            rows = list(first.values())
            encoded = self.encoder(tokens[rows], mask[rows]).cpu()
            for key, row in zip(first, encoded, strict=True):
                self._cache[key] = row
        out = torch.stack([self._cache[k] for k in keys])
        for k in keys:
            self._cache.move_to_end(k)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

    @torch.no_grad()
    def encode(self, tokens: Int[Tensor, "b l"], mask: Bool[Tensor, "b l"], device) -> dict[str, Tensor]:
        """Host tokens and mask (the batch's, or a tokenizer's) -> the encoder's states and the mask on `device`.
        The encoder uploads them itself; with the cache (text_cache > 0) rows are looked up and kept on the host,
        which reads encoded rows back: worth it on a CPU, where captions repeat; a host sync per step on CUDA."""
        if self.cache_size > 0:
            text, mask = self._encode_cached(tokens.cpu(), mask.bool().cpu()), mask.bool()
        else:
            text = self.encoder(tokens, mask)
        return dict(text=text.to(device=device, dtype=self.model_dtype), text_mask=to_device(mask, device).bool())

    def from_batch(self, batch: dict[str, Tensor], generator: torch.Generator | None, device) -> dict[str, Tensor]:
        """Every caption encoded, then the dropped ones (`generator` on `device`) replaced by the null condition,
        zeros with an all-False mask, on the device: encoding only the kept ones would need their indices on the
        host (a host sync each step) to save the encoder a tenth of its batch."""
        cond = self.encode(batch["text_tokens"], batch["attn_mask"], device)
        if generator is None:
            return cond
        keep = ~drop_mask(len(cond["text"]), self.dropout, generator)
        text = torch.where(keep[:, None, None], cond["text"], 0.0)
        return dict(text=text, text_mask=cond["text_mask"] & keep[:, None])

    @property
    def tokenizer(self):
        """The tokenizer the shards were made with (core/tokenizer.py), loaded on first use if the caller
        gave none."""
        if self._tokenizer is None:
            from core.tokenizer import TextTokenizer

            self._tokenizer = TextTokenizer(self.tokenizer_info["id"], self.max_length)
        return self._tokenizer

    def tokenize(self, prompts: list[str]) -> tuple[Int[Tensor, "b l"], Bool[Tensor, "b l"]]:
        """Prompts -> ids and mask, padded and truncated to max_length."""
        return self.tokenizer(prompts)

    def token_count(self, prompt: str) -> int:
        """Tokens `prompt` takes, special tokens included and not truncated (the encoder reads max_length)."""
        return len(self.tokenizer.tokenizer(prompt)["input_ids"])

    def from_prompts(self, prompts: list[str], device) -> dict[str, Tensor]:
        tokens, mask = self.tokenize(prompts)
        return self.encode(tokens, mask, device)

    def null(self, n: int, device) -> dict[str, Tensor]:
        width = self.hidden_size
        return dict(
            text=torch.zeros(n, self.max_length, width, device=device, dtype=self.model_dtype),
            text_mask=torch.zeros(n, self.max_length, dtype=torch.bool, device=device),
        )

    def metadata(self) -> dict[str, Any]:
        return dict(conditioning="text", tokenizer=self.tokenizer_info, text_encoder_info=self.encoder.info)


class FeatureConditioning(TextConditioning):
    """Stored encoder states (data/features.py) -> `{text, text_mask}`: the keywords, the per-sample dropout (the
    same draw from the step's generator) and the null condition of TextConditioning, with no encoder in the
    training step. The batch's `text_features` (bf16, zero at padded positions, as the encoder's output) become the
    model's dtype; a dropped caption is zeros with an all-False mask.

    Prompts (training previews) have no stored states: `from_prompts` loads the encoder with `load_encoder`, once
    per call, and drops it again. The trainer builds its previewer on rank 0 only, so the other ranks never load
    it, and no training step does.
    """

    def __init__(
        self,
        features_info: dict[str, Any],
        tokenizer_info: dict[str, Any],
        dropout: float,
        model_dtype: torch.dtype = torch.float32,
        tokenizer=None,
        load_encoder: Callable[[], FrozenTextEncoder] | None = None,
    ):
        """`features_info`: the manifest's `spec.text_features` (encoder identity, width, dtype, max_length)."""
        super().__init__(None, tokenizer_info, dropout, 0, model_dtype, tokenizer)
        self.features_info, self._load_encoder = dict(features_info), load_encoder

    @property
    def hidden_size(self) -> int:
        return int(self.features_info["width"])

    def from_batch(self, batch: dict[str, Tensor], generator: torch.Generator | None, device) -> dict[str, Tensor]:
        text, mask = to_device(batch["text_features"], device), to_device(batch["attn_mask"], device).bool()
        if generator is not None:  # on `device`, as the batch now is
            keep = ~drop_mask(len(mask), self.dropout, generator)
            mask = mask & keep[:, None]
            text = torch.where(keep[:, None, None], text, 0.0)
        return dict(text=text.to(self.model_dtype), text_mask=mask)

    def from_prompts(self, prompts: list[str], device) -> dict[str, Tensor]:
        if self._load_encoder is None:
            raise RuntimeError("prompts have no stored text features, and this conditioning has no encoder to load")
        self.encoder = self._load_encoder()
        try:
            return super().from_prompts(prompts, device)
        finally:
            self.encoder = None  # only prompts need it: the training step reads stored states

    def metadata(self) -> dict[str, Any]:
        info = dict(id=self.features_info["encoder"]["id"], hidden_size=self.hidden_size,
                    dtype=self.features_info["dtype"], model_type=self.features_info["encoder"].get("model_type"),
                    kind="stored features")
        return dict(conditioning="text", tokenizer=self.tokenizer_info, text_encoder_info=info,
                    text_features=self.features_info)
