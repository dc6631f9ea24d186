"""JointDiT: SD3-style MM-DiT [esser2024sd3] with separate context and image streams, one joint attention.

Each stream has its own adaLN modulation, QK-norm, projections and MLP; attention runs once over
[registers; context; image]. Learnable registers [darcet2024registers] are always visible, so a caption
dropped for guidance (all-False mask) still leaves valid keys. The last block's context stream only provides
keys and values.

The context is the caption's tokens (conditioning="text"; the modulation comes from sinusoid(t)) or, for
class conditioning, one token of the class embedding, which is also added to the modulation vector as in
DiT (the null class is a learned row, for guidance). With `text_pad_multiple` > 1 the context is padded with
masked rows to a multiple of it (FP8 GEMMs). The patch embedding, block loop and output layer are the shared
DiT skeleton (models/base.py).
"""

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from models.attention import JointAttention, pad_sequence, padded_length
from models.base import DiTSkeleton
from models.config import ModelConfig
from models.embeddings import LabelEmbedder
from models.layers import AdaLNModulation, Mlp, layer_norm, modulate


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


class JointDiT(DiTSkeleton):
    """Called as model(x, t, text=..., text_mask=...) or model(x, t, labels=...), per config.conditioning."""

    family = "jointdit"

    def build_conditioning(self, cfg: ModelConfig) -> None:
        if cfg.conditioning == "class":
            self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
            self.context_embed = nn.Linear(cfg.cond_dim, cfg.dim)  # the class token of the context stream
        else:
            self.context_embed = nn.Linear(cfg.text_dim, cfg.dim)
        self.registers = nn.Parameter(torch.zeros(1, cfg.num_registers, cfg.dim))

    def make_block(self, cfg: ModelConfig, index: int) -> JointDiTBlock:
        return JointDiTBlock(cfg, last=index == cfg.depth - 1)

    def init_conditioning(self) -> None:
        nn.init.normal_(self.registers, std=0.02)
        if self.config.conditioning == "class":
            nn.init.normal_(self.y_embed.table.weight, std=self.config.class_embed_std)
        for block in self.blocks:  # adaLN-Zero on both streams
            block.adaLN.zero_init()
            block.context_adaLN.zero_init()

    def condition(
        self,
        t_emb: Float[Tensor, "b cond"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        labels: Int[Tensor, "b"] | None = None,
    ) -> tuple[Float[Tensor, "b cond"], tuple[Tensor, Tensor | None, Tensor]]:
        """The modulation vector c (sinusoid(t), plus the class embedding) and the joint context
        [registers; caption tokens or the class token] with its mask: None when nothing is masked (the class
        token, unpadded), so that attention runs without one (models/attention.py)."""
        b, c = t_emb.shape[0], t_emb
        if self.config.conditioning == "class":
            y = self.y_embed(labels)
            c = c + y
            tokens, token_mask = y[:, None], None
        else:
            tokens, token_mask = text, text_mask.bool()
        tokens, token_mask = self.embed_context(tokens, token_mask)
        context = torch.cat([self.registers.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        if token_mask is None:
            return c, (context, None, c)
        mask = torch.cat([token_mask.new_ones(b, self.config.num_registers), token_mask], dim=1)
        return c, (context, mask, c)

    def embed_context(
        self, tokens: Float[Tensor, "b l e"], mask: Bool[Tensor, "b l"] | None
    ) -> tuple[Float[Tensor, "b m d"], Bool[Tensor, "b m"] | None]:
        """The context stream's tokens. With text_pad_multiple > 1, padded with masked rows so that the joint
        context [registers; tokens] is a multiple of it long, and the embedding's GEMM sees a multiple too
        (it runs on the tokens padded further, and the extra rows are cut). `mask` None: every token visible."""
        multiple, registers = self.config.text_pad_multiple, self.config.num_registers
        if multiple == 1:
            return self.context_embed(tokens), mask
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        rows = padded_length(registers + tokens.shape[1], multiple) - registers
        tokens, mask = pad_sequence(tokens, mask, padded_length(rows, multiple))
        return self.context_embed(tokens)[:, :rows], mask[:, :rows]

    def run_block(
        self, block: JointDiTBlock, h: Tensor, state: tuple[Tensor, Tensor | None, Tensor], rope: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor | None, Tensor]]:
        context, mask, c = state
        h, context = block(h, context, mask, c, rope)
        return h, (context, mask, c)
