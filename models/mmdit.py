"""mmDiT: the text-conditional PixArt-alpha transformer of Stages 2-5 [chen2023pixartalpha].

adaLN-single: one shared MLP maps sinusoid(t) to six modulation vectors s(t); block i adds its own
learnable embedding E_i. Each block runs gated self-attention, then un-gated cross-attention to the
frozen text encoder's tokens, then a gated MLP. The patch embedding, block loop and output layer are the
shared DiT skeleton (models/base.py).

Captions dropped for classifier-free guidance are an all-False mask. A learned null token is always
prepended to the text keys so that such a row still has something to attend to (PixArt learns a null
caption embedding for the same purpose); padded tokens are masked and never change the output. With
`text_pad_multiple` > 1 the keys [null; text] are padded with masked rows to a multiple of it (FP8 GEMMs).
"""

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import CrossAttention, SelfAttention, pad_sequence, padded_length
from models.base import DiTSkeleton
from models.config import ModelConfig
from models.layers import AdaLNModulation, Mlp, gated_block_forward, layer_norm


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
        text: Float[Tensor, "b l e"] | None,
        text_mask: Bool[Tensor, "b l"],
        rope: Tensor | None = None,
        text_kv: Float[Tensor, "b 2 h l e2"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """`text_kv`: this block's precomputed caption keys and values (MMDiT.prepare_condition), instead of text."""
        cross = lambda h: self.cross_attn(h, text, text_mask, text_kv)  # noqa: E731 (run between the gated pair)
        return gated_block_forward(self, x, s + self.embedding, cross=cross, rope=rope)


class MMDiT(DiTSkeleton):
    """Called as model(x, t, text=..., text_mask=...); an all-False mask is the dropped caption. A sampler may
    call `prepare_condition(text, text_mask)` once and then model(x, t, **prepared) at every step."""

    family = "mmdit"
    prepared_keys = ("text_kv", "text_mask")

    def build_conditioning(self, cfg: ModelConfig) -> None:
        self.t_block = AdaLNModulation(cfg.cond_dim, cfg.dim, chunks=6)  # adaLN-single, shared
        self.null_text = nn.Parameter(torch.zeros(1, 1, cfg.text_dim))

    def make_block(self, cfg: ModelConfig, index: int) -> MMDiTBlock:
        return MMDiTBlock(cfg)

    def init_conditioning(self) -> None:
        nn.init.normal_(self.null_text, std=0.02)
        # adaLN-Zero: s(t) = 0 and E_i = 0 close every gate; cross-attention starts at zero.
        self.t_block.zero_init()
        for block in self.blocks:
            nn.init.zeros_(block.embedding)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def keys(
        self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]
    ) -> tuple[Float[Tensor, "b m e"], Bool[Tensor, "b m"]]:
        """What cross-attention reads: [null; text], padded with masked rows to a multiple of text_pad_multiple."""
        b = text.shape[0]
        text = torch.cat([self.null_text.expand(b, 1, -1).to(text.dtype), text], dim=1)  # b (1+l) e
        text_mask = torch.cat([text_mask.new_ones(b, 1), text_mask.bool()], dim=1)
        return pad_sequence(text, text_mask, padded_length(text.shape[1], self.config.text_pad_multiple))

    def prepare_condition(
        self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]
    ) -> dict[str, Tensor]:
        """The captions' keys and values in every block, computed once: a sampler calls the model at every ODE step
        on the same captions, and these projections from the encoder's width (2048 for T5Gemma) are a sizeable
        share of a forward. `forward(x, t, **prepared)` equals `forward(x, t, text=text, text_mask=text_mask)`."""
        keys, mask = self.keys(text, text_mask)
        kv = torch.stack([torch.stack(block.cross_attn.context_kv(keys), dim=1) for block in self.blocks], dim=1)
        return dict(text_kv=kv, text_mask=mask)  # text_kv: b depth 2 h m e

    def condition(
        self,
        t_emb: Float[Tensor, "b cond"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        text_kv: Float[Tensor, "b depth 2 h m e"] | None = None,
    ) -> tuple[Float[Tensor, "b cond"], tuple]:
        """The output layer is modulated by sinusoid(t) alone; the blocks read s(t) and the keys [null; text]
        (or, prepared, their keys and values per block, with the mask already over [null; text; padding])."""
        s = self.t_block(t_emb)
        if text_kv is not None:
            return t_emb, (s, None, text_mask.bool(), text_kv.unbind(1))
        text, text_mask = self.keys(text, text_mask)
        return t_emb, (s, text, text_mask, None)

    def run_block(self, block: MMDiTBlock, h: Tensor, state: tuple, rope: Tensor | None) -> tuple[Tensor, tuple]:
        s, text, text_mask, kvs = state
        if kvs is None:
            return block(h, s, text, text_mask, rope), state
        return block(h, s, None, text_mask, rope, kvs[0]), (s, None, text_mask, kvs[1:])
