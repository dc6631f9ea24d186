"""JointDiT: SD3-style MM-DiT [esser2024sd3] with separate text and image streams, one joint attention.

Each stream has its own adaLN modulation (from sinusoid(t)), QK-norm, projections and MLP; attention
runs once over [registers; text; image]. Learnable registers [darcet2024registers] are always visible, so
a caption dropped for guidance (all-False mask) still leaves valid keys. The last block's text stream only
provides keys and values.
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import JointAttention
from models.config import ModelConfig
from models.embeddings import PatchEmbed, TimestepEmbedder, unpatchify
from models.layers import (
    AdaLNModulation,
    FinalLayer,
    Mlp,
    init_linears_xavier,
    init_patch_embed,
    layer_norm,
    modulate,
)


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
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b m d"]]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(t_emb).chunk(6, dim=-1)
        cmod = self.context_adaLN(t_emb).chunk(2 if self.last else 6, dim=-1)
        x_out, c_out = self.attn(
            modulate(self.norm1(x), shift1, scale1),
            modulate(self.context_norm1(context), cmod[0], cmod[1]),
            context_mask,
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
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "jointdit":
            raise ValueError(f"JointDiT needs family='jointdit', got {cfg.family!r}")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid)
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale)
        self.context_embed = nn.Linear(cfg.text_dim, cfg.dim)
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))
        self.blocks = nn.ModuleList(JointDiTBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch**2 * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.registers, std=0.02)
        for block in self.blocks:  # adaLN-Zero on both streams
            block.adaLN.zero_init()
            block.context_adaLN.zero_init()
        self.final.zero_init()

    def forward(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, "b"],
        text: Float[Tensor, "b l e"],
        text_mask: Bool[Tensor, "b l"],
    ) -> Float[Tensor, "b c H W"]:
        H, W = x.shape[-2:]
        b = x.shape[0]
        h = self.patch_embed(x)
        t_emb = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32; follow the model dtype
        context = torch.cat([self.registers.expand(b, -1, -1), self.context_embed(text)], dim=1)
        text_mask = text_mask.bool()
        mask = torch.cat([text_mask.new_ones(b, self.config.num_registers), text_mask], dim=1)
        for block in self.blocks:
            h, context = block(h, context, mask, t_emb)
        p = self.config.patch
        return unpatchify(self.final(h, t_emb), p, self.config.out_channels, H // p, W // p)
