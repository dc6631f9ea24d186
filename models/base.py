"""The contract every model family implements: what the trainer, the sampler, the fast path and the tools rely on.

* `config: ModelConfig`, enough to rebuild the model (saved with every checkpoint);
* `blocks`: the sequence of blocks that activation checkpointing and per-block compile act on
  (trainer/fast_path.py), each an nn.Module called once per forward. They live where the model registered
  them, so parameter names never change: a DiT's `blocks` ModuleList, a PixelDiT's semantic blocks then its
  pixel blocks;
* `forward(x, t, **cond)`: the velocity (or clean image) for x [b, c, H, W] at times t [b], with the
  conditioning by keyword: `labels=` [b] (class) or `text=` [b, l, e] and `text_mask=` [b, l] (text; True =
  a real token). Positional `text, text_mask` (or `labels`) are accepted too and named by `condition_keys`. It
  checks the keywords once (`condition_keywords`) and returns `head(*features(x, t, **cond), (H, W))`;
* `features(x, t, **cond)`: what the output head reads, (tokens, the vector or tokens that modulate it), from
  keywords as `forward` checked them (PixelDiT calls its semantic stream's);
* `null_condition(n, device)`: the keywords of the unconditional input for guidance: the null class, or
  zeros with an all-False text mask; `null_label` (class models) is that class's index, `check_labels` the
  range check of user-given labels;
* `prepared_keys` and `prepare_condition(**cond)` where a family has conditioning worth computing once for every
  sampling step (the caption's keys and values of cross-attention: models/layers.py, prepare_captions).

Each family writes its constructor, its initialisation and its `features` top to bottom in its own file, as
DiT's models.py does [peebles2023]; what they share are modules and functions (models/embeddings.py,
models/layers.py, models/rope.py, models/attention.py), not a skeleton to fill in. The parameter names, their
order and the initialisation's draws from the global RNG are pinned by tests/test_model_contract.py.
"""

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from models.config import ModelConfig
from models.embeddings import check_labels, null_label_for

CONDITION_KEYS: dict[str, tuple[str, ...]] = {"class": ("labels",), "text": ("text", "text_mask")}
"""The keywords a model takes for each conditioning, in the order positional arguments are read."""


def family_config(cfg: ModelConfig, model: type, *families: str) -> ModelConfig:
    """`cfg`, once its family is one of `families`: a ValueError naming the class otherwise."""
    if cfg.family not in families:
        raise ValueError(f"{model.__name__} needs family={' or '.join(map(repr, families))}, got {cfg.family!r}")
    return cfg


class DiffusionTransformer(nn.Module):
    """The model contract (see the module docstring). Subclasses set `config` and `blocks` and implement
    `features` and `head`."""

    config: ModelConfig
    blocks: Sequence[nn.Module]
    prepared_keys: tuple[str, ...] = ()
    """The keywords `prepare_condition` returns, which forward takes in place of condition_keys (none: no
    preparation; the sampler then passes the conditioning as it is)."""

    def forward(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, " b"], *args: Tensor, **cond: Tensor
    ) -> Float[Tensor, "b c H W"]:
        tokens, modulation = self.features(x, t, **self.condition_keywords(args, cond))
        return self.head(tokens, modulation, (x.shape[-2], x.shape[-1]))

    def features(self, x: Float[Tensor, "b c H W"], t: Float[Tensor, " b"], **cond: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def head(self, tokens: Tensor, modulation: Tensor, size: tuple[int, int]) -> Tensor:
        """The output layer: `features`' result -> the prediction [b, out_channels, *size]."""
        raise NotImplementedError

    @property
    def condition_keys(self) -> tuple[str, ...]:
        return CONDITION_KEYS[self.config.conditioning]

    def condition_keywords(self, args: Sequence[Tensor], cond: dict[str, Tensor]) -> dict[str, Tensor]:
        """Positional conditioning named by `condition_keys`, merged with the keywords; a TypeError naming the
        expected keywords when the set is not exactly this model's."""
        keys = self.condition_keys
        if len(args) > len(keys) or set(keys[: len(args)]) & set(cond):
            raise TypeError(f"{self.config.name} takes its conditioning as {self._expected()}; got "
                            f"{len(args)} positional and {sorted(cond)} by keyword")
        named = dict(zip(keys, args, strict=False)) | cond
        if self.prepared_keys and not args and set(named) == set(self.prepared_keys):
            return named
        if set(named) != set(keys):
            raise TypeError(f"a {self.config.conditioning}-conditional {self.config.name} takes {self._expected()}"
                            f", got {', '.join(sorted(named)) or 'none'}")
        return named

    def _expected(self) -> str:
        return " and ".join(f"{k}=" for k in self.condition_keys)

    @property
    def null_label(self) -> int:
        """The null class's label (class conditioning only): the row after the real classes."""
        if self.config.conditioning != "class":
            raise AttributeError(f"a text-conditional {self.config.name} has no null label; use null_condition")
        return null_label_for(self.config.num_classes)

    def check_labels(self, labels: Sequence[Any], what: str = "labels") -> list[int]:
        """`labels` as ints, each a real class or the null class; a ValueError naming `what` otherwise."""
        return check_labels(labels, self.config.num_classes, what)

    def null_condition(self, n: int, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """The keywords of n unconditional inputs: the null class, or zero text with an all-False mask (in the
        model's dtype, at config.text_len tokens; any length works, since every token is masked)."""
        cfg = self.config
        if cfg.conditioning == "class":
            return dict(labels=torch.full((n,), self.null_label, dtype=torch.long, device=device))
        dtype = next(p.dtype for p in self.parameters() if p.is_floating_point())
        return dict(text=torch.zeros(n, cfg.text_len, cfg.text_dim, dtype=dtype, device=device),
                    text_mask=torch.zeros(n, cfg.text_len, dtype=torch.bool, device=device))
