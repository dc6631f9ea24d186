"""ccDiT: the class-conditional DiT of Stage 1 [peebles2023], with per-block adaLN-Zero and QK-RMSNorm.

Conditioning c = sinusoid(t) + class embedding (both cond_dim wide); every block maps c through its own
two-layer adaLN MLP to six modulation vectors. reparameterize.py turns this model into an mmDiT. The patch
embedding, block loop and output layer are the shared DiT skeleton (models/base.py).
"""

from jaxtyping import Float, Int
from torch import Tensor, nn

from models.attention import SelfAttention
from models.base import DiTSkeleton
from models.config import ModelConfig
from models.embeddings import LabelEmbedder
from models.layers import AdaLNModulation, Mlp, gated_block_forward, layer_norm


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
        return gated_block_forward(self, x, self.adaLN(c), rope=rope)


class CCDiT(DiTSkeleton):
    """Called as model(x, t, labels=...); label num_classes is the null class."""

    family = "ccdit"

    def build_conditioning(self, cfg: ModelConfig) -> None:
        self.y_embed = LabelEmbedder(cfg.num_classes, cfg.cond_dim)

    def make_block(self, cfg: ModelConfig, index: int) -> CCDiTBlock:
        return CCDiTBlock(cfg)

    def init_conditioning(self) -> None:
        nn.init.normal_(self.y_embed.table.weight, std=self.config.class_embed_std)
        # adaLN-Zero [peebles2023]: every block starts as the identity.
        for block in self.blocks:
            block.adaLN.zero_init()

    def condition(
        self, t_emb: Float[Tensor, "b cond"], labels: Int[Tensor, "b"]
    ) -> tuple[Float[Tensor, "b cond"], Float[Tensor, "b cond"]]:
        """c = sinusoid(t) + class embedding, for the output layer and every block alike."""
        c = t_emb + self.y_embed(labels)
        return c, c

    def run_block(self, block: CCDiTBlock, h: Tensor, c: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
        return block(h, c, rope), c
