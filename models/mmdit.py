"""mmDiT: the text-conditional PixArt-alpha transformer of Stages 2-5 [chen2023pixartalpha].

adaLN-single: one shared MLP maps sinusoid(t) to six modulation vectors s(t); block i adds its own
learnable embedding E_i. Each block runs gated self-attention, then un-gated cross-attention to the
frozen text encoder's tokens, then a gated MLP. The output layer is modulated by sinusoid(t) alone.

Captions dropped for classifier-free guidance are an all-False mask. A learned null token is always
prepended to the text keys so that such a row still has something to attend to (PixArt learns a null
caption embedding for the same purpose); padded tokens are masked and never change the output. With
`text_pad_multiple` > 1 the keys [null; text] are padded with masked rows to a multiple of it (FP8 GEMMs).
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import CrossAttention, SelfAttention
from models.base import DiffusionTransformer, family_config
from models.config import ModelConfig
from models.embeddings import PatchEmbed, TimestepEmbedder
from models.layers import (
    PREPARED_KEYS,
    AdaLNModulation,
    FinalLayer,
    Mlp,
    block_captions,
    init_dit_weights,
    layer_norm,
    modulate,
    pad_to_multiple,
    prepare_captions,
)
from models.rope import grid_rope


class MMDiTBlock(nn.Module):
    """x += g1 * Attn(modulate(LN x)); x += CrossAttn(x, text); x += g2 * MLP(modulate(LN x)); modulation
    s(t) + E_i."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(6 * cfg.dim))  # E_i, added to the shared s(t)
        self.norm1 = layer_norm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(cfg.dim, cfg.text_dim, cfg.heads, cfg.qk_norm)
        self.norm2 = layer_norm(cfg.dim)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        s: Float[Tensor, "b m"],
        text: Float[Tensor, "b l e"] | None,
        text_mask: Bool[Tensor, "b l"],
        rope: Tensor | None = None,
        text_kv: Float[Tensor, "b 2 h l e2"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """`text`: the caption keys (MMDiT.caption_keys), or None with `text_kv`, this block's prepared keys and
        values (prepare_condition)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (s + self.embedding).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        x = x + self.cross_attn(x, text, text_mask, text_kv)  # un-gated, on the un-normalised tokens
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class MMDiT(DiffusionTransformer):
    """Called as model(x, t, text=..., text_mask=...); an all-False mask is the dropped caption. A sampler may
    call `prepare_condition(text, text_mask)` once and then model(x, t, **prepared) at every step.
    `with_head=False` leaves out the output layer (PixelDiT's semantic stream)."""

    prepared_keys = PREPARED_KEYS

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        self.config = family_config(cfg, type(self), "mmdit")
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale, cfg.time_max_period)
        self.t_block = AdaLNModulation(cfg.cond_dim, cfg.dim, chunks=6)  # adaLN-single, shared
        self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))
        self.blocks = nn.ModuleList(MMDiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch, cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self, self.patch_embed.proj)
        nn.init.normal_(self.null_text, std=0.02)
        # adaLN-Zero: s(t) = 0 and E_i = 0 close every gate; cross-attention starts at zero; so does the output.
        self.t_block.zero_init()
        for block in self.blocks:
            nn.init.zeros_(block.embedding)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        if self.final is not None:
            self.final.zero_init()

    def features(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, " b"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b _"] | None = None,
        text_kv: Float[Tensor, "b depth 2 h m e2"] | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b cond"]]:
        """The last block's tokens, and sinusoid(t), which modulates the output layer. The caption comes as text
        and text_mask, or prepared (`prepare_condition`) as text_kv and the mask over its keys."""
        h = self.patch_embed(x)  # b n d, positions added
        t_emb = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32: follow the model's dtype
        s = self.t_block(t_emb)  # adaLN-single: s(t), one MLP for every block
        keys, mask, kvs = block_captions(self.caption_keys, len(self.blocks), text, text_mask, text_kv)
        rope = grid_rope(self.config, x)  # None unless config.rope
        for block, kv in zip(self.blocks, kvs, strict=True):
            h = block(h, s, keys, mask, rope, kv)
        return h, t_emb

    def head(
        self, tokens: Float[Tensor, "b n d"], t_emb: Float[Tensor, "b cond"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        return self.final(tokens, t_emb, size)

    def caption_keys(
        self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]
    ) -> tuple[Float[Tensor, "b m e"], Bool[Tensor, "b m"]]:
        """What cross-attention reads: [null; text], padded with masked rows to a multiple of text_pad_multiple."""
        b = text.shape[0]
        text = torch.cat([self.null_text.expand(b, 1, -1).to(text.dtype), text], dim=1)  # b (1+l) e
        text_mask = torch.cat([text_mask.new_ones(b, 1), text_mask.bool()], dim=1)
        return pad_to_multiple(text, text_mask, self.config.text_pad_multiple)

    def prepare_condition(self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]) -> dict[str, Tensor]:
        """The caption's keys and values in every block, computed once for all the steps of a sampler:
        `forward(x, t, **prepared)` equals `forward(x, t, text=text, text_mask=text_mask)`."""
        return prepare_captions(self.blocks, *self.caption_keys(text, text_mask))
