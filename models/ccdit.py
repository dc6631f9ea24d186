"""ccDiT: the class-conditional DiT of Stage 1 [peebles2023], with per-block adaLN-Zero and QK-RMSNorm.

Conditioning c = sinusoid(t) + class embedding (both cond_dim wide); every block maps c through its own
two-layer adaLN MLP to six modulation vectors, and the output layer through its own to two. reparameterize.py
turns this model into an mmDiT.
"""

from jaxtyping import Float, Int
from torch import Tensor, nn

from models.attention import SelfAttention
from models.base import DiffusionTransformer, family_config
from models.config import ModelConfig
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder
from models.layers import AdaLNModulation, FinalLayer, Mlp, init_dit_weights, layer_norm, modulate
from models.rope import grid_rope


class CCDiTBlock(nn.Module):
    """x += gate1 * Attn(modulate(LN x)); x += gate2 * MLP(modulate(LN x)); modulation from c."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.adaLN = AdaLNModulation(cfg.cond_dim, cfg.dim, chunks=6)
        self.norm1 = layer_norm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.qk_norm)
        self.norm2 = layer_norm(cfg.dim)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))

    def forward(
        self, x: Float[Tensor, "b n d"], c: Float[Tensor, "b cond"], rope: Tensor | None = None
    ) -> Float[Tensor, "b n d"]:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CCDiT(DiffusionTransformer):
    """Called as model(x, t, labels=...); label num_classes is the null class. `with_head=False` leaves out the
    output layer: PixelDiT reads the blocks' tokens as its semantic stream."""

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        self.config = family_config(cfg, type(self), "ccdit")
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale, cfg.time_max_period)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
        self.blocks = nn.ModuleList(CCDiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch, cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_dit_weights(self, self.patch_embed.proj)
        nn.init.normal_(self.y_embed.table.weight, std=self.config.class_embed_std)
        for block in self.blocks:  # adaLN-Zero [peebles2023]: every block starts as the identity ...
            block.adaLN.zero_init()
        if self.final is not None:  # ... and an untrained model outputs exactly zero
            self.final.zero_init()

    def features(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, " b"], labels: Int[Tensor, " b"]
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b cond"]]:
        """The last block's tokens, and c, which modulates every block and the output layer."""
        h = self.patch_embed(x)  # b n d, positions added
        c = self.t_embed(t).to(h.dtype) + self.y_embed(labels)  # the sinusoid is fp32: follow the model's dtype
        rope = grid_rope(self.config, x)  # None unless config.rope
        for block in self.blocks:
            h = block(h, c, rope)
        return h, c

    def head(
        self, tokens: Float[Tensor, "b n d"], c: Float[Tensor, "b cond"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        return self.final(tokens, c, size)
