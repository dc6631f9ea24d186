"""ccDiT: the class-conditional DiT of Stage 1 [peebles2023], with per-block adaLN-Zero and QK-RMSNorm.

Conditioning c = sinusoid(t) + class embedding (both cond_dim wide); every block maps c through its own
two-layer adaLN MLP to six modulation vectors. reparameterize.py turns this model into an mmDiT.
"""

from jaxtyping import Float, Int
from torch import Tensor, nn

from models.attention import SelfAttention
from models.config import ModelConfig
from models.embeddings import LabelEmbedder, PatchEmbed, TimestepEmbedder, unpatchify
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
        self, x: Float[Tensor, "b n d"], c: Float[Tensor, "b c"], rope: Tensor | None = None
    ) -> Float[Tensor, "b n d"]:
        return gated_block_forward(self, x, self.adaLN(c), rope=rope)


class CCDiT(nn.Module):
    """`with_head=False` leaves out the final layer: PixelDiT uses the blocks' tokens as its semantic stream."""

    def __init__(self, cfg: ModelConfig, with_head: bool = True):
        super().__init__()
        if cfg.family != "ccdit":
            raise ValueError(f"CCDiT needs family='ccdit', got {cfg.family!r}")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid, cfg.pos_embed == "learned")
        self.t_embed = TimestepEmbedder(cfg.cond_dim, cfg.time_scale)
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)
        self.blocks = nn.ModuleList(CCDiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg.dim, cfg.cond_dim, cfg.patch**2 * cfg.out_channels) if with_head else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears_xavier(self)
        init_patch_embed(self.patch_embed.proj)
        nn.init.normal_(self.y_embed.table.weight, std=0.02)
        # adaLN-Zero [peebles2023]: every block starts as the identity and the output as exactly zero.
        for block in self.blocks:
            block.adaLN.zero_init()
        if self.final is not None:
            self.final.zero_init()

    @property
    def null_label(self) -> int:
        return self.y_embed.null_label

    def features(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, "b"], labels: Int[Tensor, "b"]
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b c"]]:
        """The last block's tokens and the conditioning vector c = sinusoid(t) + class embedding."""
        H, W = x.shape[-2:]
        h = self.patch_embed(x)
        c = self.t_embed(t).to(h.dtype) + self.y_embed(labels)
        rope = grid_rope(self.config, H // self.config.patch, W // self.config.patch, x.device)
        for block in self.blocks:
            h = block(h, c, rope)
        return h, c

    def forward(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, "b"], labels: Int[Tensor, "b"]
    ) -> Float[Tensor, "b c H W"]:
        H, W = x.shape[-2:]
        h, c = self.features(x, t, labels)
        p = self.config.patch
        return unpatchify(self.final(h, c), p, self.config.out_channels, H // p, W // p)
