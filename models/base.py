"""The contract every model family implements, and the DiT skeleton that ccDiT, mmDiT and JointDiT share.

`DiffusionTransformer` is what the trainer, the sampler, the fast path and the tools may rely on:

* `config: ModelConfig`, enough to rebuild the model (saved with every checkpoint);
* `blocks`: the sequence of blocks that activation checkpointing and per-block compile act on
  (trainer/fast_path.py), each an nn.Module called once per forward. They live where the model registered
  them, so parameter names never change: a DiT's `blocks` ModuleList, a PixelDiT's semantic blocks then its
  pixel blocks;
* `forward(x, t, **cond)`: the velocity (or clean image) for x [b, c, H, W] at times t [b], with the
  conditioning by keyword: `labels=` [b] (class) or `text=` [b, l, e] and `text_mask=` [b, l] (text; True =
  a real token). Positional `text, text_mask` (or `labels`) are accepted too and named by `condition_keys`;
* `features(x, t, **cond)`: what the output head reads, (tokens, the vector or tokens that modulate it);
  `forward` is `head(*features(...))` for every family;
* `null_condition(n, device)`: the keywords of the unconditional input for guidance: the null class, or
  zeros with an all-False text mask; `null_label` (class models) is that class's index, `check_labels` the
  range check of user-given labels.

`DiTSkeleton` is the patch-level DiT [peebles2023] written once: patch embedding with positions, the
sinusoidal time embedding, the block loop with 2-D RoPE, the adaLN final layer, unpatchify, and the
initialisation preamble (xavier, then the patch conv; the family's own draws and zero inits; the output layer
zeroed last). A family supplies only what differs: its conditioning modules (`build_conditioning`), its block
(`make_block`), its initialisation (`init_conditioning`), how the conditioning becomes the vector the output
layer is modulated with and what the blocks read (`condition`), and how one block is called (`run_block`).
The order of construction is fixed here, so parameter names, their order and the initialisation's draws from
the global RNG are those of the original per-family classes (tests/test_model_contract.py pins them).
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from jaxtyping import Float
from torch import Tensor, nn

from models.config import ModelConfig
from models.embeddings import PatchEmbed, TimestepEmbedder, check_labels, null_label_for, unpatchify
from models.layers import FinalLayer, init_linears_xavier, init_patch_embed
from models.rope import grid_rope

CONDITION_KEYS: dict[str, tuple[str, ...]] = {"class": ("labels",), "text": ("text", "text_mask")}
"""The keywords a model takes for each conditioning, in the order positional arguments are read."""


class DiffusionTransformer(nn.Module):
    """The model contract (see the module docstring). Subclasses set `config` and `blocks` and implement
    `features` and `head`."""

    config: ModelConfig
    blocks: Sequence[nn.Module]
    prepared_keys: tuple[str, ...] = ()
    """The keywords `prepare_condition` returns, which forward takes in place of condition_keys (none: no
    preparation; the sampler then passes the conditioning as it is)."""

    def features(self, x: Float[Tensor, "b c H W"], t: Float[Tensor, "b"], **cond: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def head(self, tokens: Tensor, modulation: Tensor, size: tuple[int, int]) -> Tensor:
        """The output layer: `features`' result -> the prediction [b, out_channels, *size]."""
        raise NotImplementedError

    def forward(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, "b"], *args: Tensor, **cond: Tensor
    ) -> Float[Tensor, "b c H W"]:
        tokens, modulation = self.features(x, t, **self.condition_keywords(args, cond))
        return self.head(tokens, modulation, (x.shape[-2], x.shape[-1]))

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


class DiTSkeleton(DiffusionTransformer):
    """The shared DiT: patch embed -> (time, conditioning) -> blocks -> adaLN final layer -> unpatchify.

    `with_head=False` leaves out the final layer: PixelDiT uses the blocks' tokens as its semantic stream.
    """

    family: ClassVar[str]

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        if cfg.family != self.family:
            raise ValueError(f"{type(self).__name__} needs family={self.family!r}, got {cfg.family!r}")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale, cfg.time_max_period)
        self.build_conditioning(cfg)  # registered here, between the embeddings and the blocks, as always
        self.blocks = nn.ModuleList(self.make_block(cfg, i) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch**2 * cfg.out_channels) if with_head else None
        self.initialize_weights()

    # ---- what a family supplies ---------------------------------------------------------------------------

    def build_conditioning(self, cfg: ModelConfig) -> None:
        """Register the family's conditioning modules and parameters."""

    def make_block(self, cfg: ModelConfig, index: int) -> nn.Module:
        raise NotImplementedError

    def init_conditioning(self) -> None:
        """The family's initialisation after the shared xavier pass: its own draws, then its zero inits."""

    def condition(self, t_emb: Float[Tensor, "b cond"], **cond: Tensor) -> tuple[Float[Tensor, "b cond"], Any]:
        """(the vector the final layer is modulated with, the state the blocks read) from sinusoid(t) and the
        conditioning keywords."""
        raise NotImplementedError

    def run_block(self, block: nn.Module, h: Tensor, state: Any, rope: Tensor | None) -> tuple[Tensor, Any]:
        """One block: (its output tokens, the state for the next block)."""
        raise NotImplementedError

    # ---- the skeleton -----------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_patch_embed(self.patch_embed.proj)
        self.init_conditioning()
        if self.final is not None:
            self.final.zero_init()  # adaLN-Zero [peebles2023]: an untrained model outputs exactly zero

    def features(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, "b"], **cond: Tensor
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b cond"]]:
        """The last block's tokens and the vector the output layer is modulated with."""
        cond = self.condition_keywords((), cond)
        H, W = x.shape[-2:]
        p = self.config.patch
        h = self.patch_embed(x)
        t_emb = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32; follow the model dtype
        c, state = self.condition(t_emb, **cond)
        rope = grid_rope(self.config, H // p, W // p, x.device)
        for block in self.blocks:
            h, state = self.run_block(block, h, state, rope)
        return h, c

    def head(
        self, tokens: Float[Tensor, "b n d"], modulation: Float[Tensor, "b cond"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        if self.final is None:
            raise RuntimeError(f"this {type(self).__name__} was built with_head=False (a semantic stream): "
                               "call features()")
        p = self.config.patch
        return unpatchify(self.final(tokens, modulation), p, self.config.out_channels, size[0] // p, size[1] // p)

