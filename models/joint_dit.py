"""JointDiT: SD3-style MM-DiT [esser2024sd3] with separate context and image streams, one joint attention.

Each stream has its own adaLN modulation, QK-norm, projections and MLP; attention runs once over
[registers; context; image]. Learnable registers [darcet2024registers] are always visible, so a caption
dropped for guidance (all-False mask) still leaves valid keys. The last block's context stream only provides
keys and values.

The context is the caption's tokens (conditioning="text"; the modulation comes from sinusoid(t)) or, for
class conditioning, one token of the class embedding, which is also added to the modulation vector as in
DiT (the null class is a learned row, for guidance).
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from models.attention import JointAttention
from models.config import ModelConfig
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
from models.layers import (
    AdaLNModulation,
    FinalLayer,
    Mlp,
    init_linears_xavier,
    init_patch_embed,
    layer_norm,
    modulate,
)
from models.rope import grid_rope


class JointDiTBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, last: bool):
        super().__init__()
        d, hidden = cfg.dim, int(cfg.dim * cfg.mlp_ratio)
        self.last = last
        self.adaLN = AdaLNModulation(cfg.cond_dim, d, chunks=6)
        self.norm1 = layer_norm(d)
        self.attn = JointAttention(d, cfg.heads, cfg.qk_norm, context_out=not last)
        self.norm2 = layer_norm(d)
        self.mlp = Mlp(d, hidden)
        # Text stream: the last block only needs shift and scale for its keys and values.
        self.context_adaLN = AdaLNModulation(cfg.cond_dim, d, chunks=2 if last else 6)
        self.context_norm1 = layer_norm(d)
        if not last:
            self.context_norm2 = layer_norm(d)
            self.context_mlp = Mlp(d, hidden)

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        context: Float[Tensor, "b m d"],
        context_mask: Bool[Tensor, "b m"],
        t_emb: Float[Tensor, "b c"],
        rope: Tensor | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b m d"]]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(t_emb).chunk(6, dim=-1)
        cmod = self.context_adaLN(t_emb).chunk(2 if self.last else 6, dim=-1)
        x_out, c_out = self.attn(
            modulate(self.norm1(x), shift1, scale1),
            modulate(self.context_norm1(context), cmod[0], cmod[1]),
            context_mask,
            rope,
        )
        x = x + gate1[:, None] * x_out
        x = x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))
        if self.last:
            return x, context
        _, _, cgate1, cshift2, cscale2, cgate2 = cmod
        context = context + cgate1[:, None] * c_out
        context = context + cgate2[:, None] * self.context_mlp(modulate(self.context_norm2(context), cshift2, cscale2))
        return x, context


class JointDiT(nn.Module):
    """`with_head=False` leaves out the final layer: MM-PixelDiT uses the blocks' tokens as its semantic stream."""

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        if cfg.family != "jointdit":
            raise ValueError(f"JointDiT needs family='jointdit', got {cfg.family!r}")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale)
        if cfg.conditioning == "class":
            self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
            self.context_embed = nn.Linear(cfg.cond_dim, cfg.dim)  # the class token of the context stream
        else:
            self.context_embed = nn.Linear(cfg.text_dim, cfg.dim)
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))
        self.blocks = nn.ModuleList(JointDiTBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch**2 * cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.registers, std=0.02)
        if self.config.conditioning == "class":
            nn.init.normal_(self.y_embed.table.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero on both streams
            block.adaLN.zero_init()
            block.context_adaLN.zero_init()
        if self.final is not None:
            self.final.zero_init()

    @property
    def null_label(self) -> int:
        return self.y_embed.null_label

    def features(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, "b"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        labels: Int[Tensor, "b"] | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b c"]]:
        """The last block's image tokens and the modulation vector (sinusoid(t), plus the class embedding)."""
        H, W = x.shape[-2:]
        b = x.shape[0]
        h = self.patch_embed(x)
        c = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32; follow the model dtype
        if self.config.conditioning == "class":
            if labels is None:
                raise TypeError("a class-conditional JointDiT takes labels=, not text")
            y = self.y_embed(labels)
            c = c + y
            tokens, token_mask = self.context_embed(y)[:, None], torch.ones(b, 1, dtype=torch.bool, device=x.device)
        else:
            if text is None or text_mask is None:
                raise TypeError("a text-conditional JointDiT takes text= and text_mask=")
            tokens, token_mask = self.context_embed(text), text_mask.bool()
        context = torch.cat([self.registers.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([token_mask.new_ones(b, self.config.num_registers), token_mask], dim=1)
        rope = grid_rope(self.config, H // self.config.patch, W // self.config.patch, x.device)
        for block in self.blocks:
            h, context = block(h, context, mask, c, rope)
        return h, c

    def forward(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, "b"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        labels: Int[Tensor, "b"] | None = None,
    ) -> Float[Tensor, "b c H W"]:
        """text and text_mask (text conditioning) or labels (class conditioning)."""
        H, W = x.shape[-2:]
        h, c = self.features(x, t, text, text_mask, labels)
        p = self.config.patch
        return unpatchify(self.final(h, c), p, self.config.out_channels, H // p, W // p)
