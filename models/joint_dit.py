"""JointDiT: SD3-style MM-DiT [esser2024sd3] with separate context and image streams, one joint attention.

Each stream has its own adaLN modulation, QK-norm, projections and MLP; attention runs once over
[registers; context; image]. Learnable registers [darcet2024registers] are always visible, so a caption
dropped for guidance (all-False mask) still leaves valid keys. The last block's context stream only provides
keys and values.

The context is the caption's tokens (conditioning="text"; the modulation comes from sinusoid(t)) or, for
class conditioning, one token of the class embedding, which is also added to the modulation vector as in
DiT (the null class is a learned row, for guidance). With `text_pad_multiple` > 1 the context is padded with
masked rows to a multiple of it (FP8 GEMMs).
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from models.attention import JointAttention, pad_sequence, padded_length
from models.base import DiffusionTransformer, family_config
from models.config import ModelConfig
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder
from models.layers import AdaLNModulation, FinalLayer, Mlp, init_dit_weights, layer_norm, modulate
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
        context_mask: Bool[Tensor, "b m"] | None,
        t_emb: Float[Tensor, "b cond"],
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


class JointDiT(DiffusionTransformer):
    """Called as model(x, t, text=..., text_mask=...) or model(x, t, labels=...), per config.conditioning.
    `with_head=False` leaves out the output layer (MM-PixelDiT's semantic stream)."""

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        self.config = family_config(cfg, type(self), "jointdit")
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale, cfg.time_max_period)
        if cfg.conditioning == "class":
            self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
            self.context_embed = nn.Linear(cfg.cond_dim, cfg.dim)  # the class token of the context stream
        else:
            self.context_embed = nn.Linear(cfg.text_dim, cfg.dim)
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))
        self.blocks = nn.ModuleList(JointDiTBlock(cfg, last=i == cfg.depth - 1) for i in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch, cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self, self.patch_embed.proj)
        nn.init.normal_(self.registers, std=0.02)
        if self.config.conditioning == "class":
            nn.init.normal_(self.y_embed.table.weight, std=self.config.class_embed_std)
        for block in self.blocks:  # adaLN-Zero on both streams, and a zero output
            block.adaLN.zero_init()
            block.context_adaLN.zero_init()
        if self.final is not None:
            self.final.zero_init()

    def features(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, " b"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        labels: Int[Tensor, " b"] | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b cond"]]:
        """The last block's image tokens, and c (sinusoid(t), plus the class embedding), which modulates both
        streams of every block and the output layer."""
        h = self.patch_embed(x)  # b n d, positions added
        c = self.t_embed(t).to(h.dtype)  # the sinusoid is fp32: follow the model's dtype
        if self.config.conditioning == "class":  # the class joins c, and is the context's one token
            y = self.y_embed(labels)
            c, tokens, token_mask = c + y, y[:, None], None  # nothing masked: attention runs without a mask
        else:
            tokens, token_mask = text, text_mask.bool()
        context, mask = self.joint_context(tokens, token_mask)  # [registers; tokens]
        rope = grid_rope(self.config, x)  # None unless config.rope
        for block in self.blocks:
            h, context = block(h, context, mask, c, rope)
        return h, c

    def head(
        self, tokens: Float[Tensor, "b n d"], c: Float[Tensor, "b cond"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        return self.final(tokens, c, size)

    def joint_context(
        self, tokens: Float[Tensor, "b l e"], mask: Bool[Tensor, "b l"] | None
    ) -> tuple[Float[Tensor, "b m d"], Bool[Tensor, "b m"] | None]:
        """The context stream's input, [registers; embedded tokens], and its mask: None when nothing is masked (the
        class token, unpadded), so that attention runs without one (models/attention.py). With text_pad_multiple > 1
        the tokens are padded with masked rows so that the whole is a multiple of it long, and the embedding's GEMM
        sees a multiple too (it runs on the tokens padded further, and the extra rows are cut)."""
        b, multiple, registers = tokens.shape[0], self.config.text_pad_multiple, self.config.num_registers
        if multiple == 1:
            tokens = self.context_embed(tokens)
        else:
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            rows = padded_length(registers + tokens.shape[1], multiple) - registers
            tokens, mask = pad_sequence(tokens, mask, padded_length(rows, multiple))
            tokens, mask = self.context_embed(tokens)[:, :rows], mask[:, :rows]
        context = torch.cat([self.registers.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        if mask is None:
            return context, None
        return context, torch.cat([mask.new_ones(b, registers), mask], dim=1)
