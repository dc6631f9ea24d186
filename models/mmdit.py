"""mmDiT: the text-conditional PixArt-alpha transformer of Stages 2-5 [chen2023pixartalpha].

adaLN-single: one shared MLP maps sinusoid(t) to six modulation vectors s(t); block i adds its own
learnable embedding E_i. Each block runs gated self-attention, then un-gated cross-attention to the
frozen text encoder's tokens, then a gated MLP.

Captions dropped for classifier-free guidance are an all-False mask. A learned null token is always
prepended to the text keys so that such a row still has something to attend to (PixArt learns a null
caption embedding for the same purpose); padded tokens are masked and never change the output.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import CrossAttention, SelfAttention
from models.config import ModelConfig
from models.embeddings import PatchEmbed, TimestepEmbedder, unpatchify
from models.layers import (
    AdaLNModulation,
    FinalLayer,
    Mlp,
    gated_block_forward,
    init_linears_xavier,
    init_patch_embed,
    layer_norm,
)
from models.rope import grid_rope


class MMDiTBlock(nn.Module):
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
        text: Float[Tensor, "b l c"],
        text_mask: Bool[Tensor, "b l"],
        rope: Tensor | None = None,
    ) -> Float[Tensor, "b n d"]:
        cross = lambda h: self.cross_attn(h, text, text_mask)  # noqa: E731 (run between the gated pair)
        return gated_block_forward(self, x, s + self.embedding, cross=cross, rope=rope)


class MMDiT(nn.Module):
    """`with_head=False` leaves out the final layer: PixelDiT uses the blocks' tokens as its semantic stream."""

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        if cfg.family != "mmdit":
            raise ValueError(f"MMDiT needs family='mmdit', got {cfg.family!r}")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale)
        self.t_block = AdaLNModulation(cfg.cond_dim, cfg.dim, chunks=6)  # adaLN-single, shared
        self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))
        self.blocks = nn.ModuleList(MMDiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch**2 * cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.null_text, std=0.02)
        # adaLN-Zero: s(t) = 0 and E_i = 0 close every gate; cross-attention and the output start at zero.
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
        t: Float[Tensor, "b"],
        text: Float[Tensor, "b l e"],
        text_mask: Bool[Tensor, "b l"],
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b c"]]:
        """The last block's tokens and the vector the output layer is modulated with, sinusoid(t)."""
        H, W = x.shape[-2:]
        h = self.patch_embed(x)
        t_emb = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32; follow the model dtype
        s = self.t_block(t_emb)
        b = x.shape[0]
        text = torch.cat([self.null_text.expand(b, 1, -1).to(text.dtype), text], dim=1)  # b (1+l) e
        text_mask = torch.cat([text_mask.new_ones(b, 1), text_mask.bool()], dim=1)
        rope = grid_rope(self.config, H // self.config.patch, W // self.config.patch, x.device)
        for block in self.blocks:
            h = block(h, s, text, text_mask, rope)
        return h, t_emb

    def forward(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, "b"],
        text: Float[Tensor, "b l e"],
        text_mask: Bool[Tensor, "b l"],
    ) -> Float[Tensor, "b c H W"]:
        H, W = x.shape[-2:]
        h, t_emb = self.features(x, t, text, text_mask)
        p = self.config.patch
        return unpatchify(self.final(h, t_emb), p, self.config.out_channels, H // p, W // p)
