"""PixelDiT and MM-PixelDiT: pixel-space DiTs with a patch-level semantic stream and a pixel-level stream
[pixeldit2025].

    image [b, C, H, W] --patch P--> semantic blocks (ccDiT / mmDiT / JointDiT, unchanged) --> s [b, n, D]
    image --per pixel--> pixel tokens [b, n, P*P, d]  (n = (H/P) (W/P) patches, d = model.pixel_dim)
        --> pixel (PiT) blocks, each modulated pixel by pixel from s --> per-pixel output head --> [b, C, H, W]

A pixel block keeps a token of width d for every pixel, far narrower than D, and differs from a DiT block in
two ways:

* pixel-wise adaLN: the shift, scale and gate of pixel j in patch i come from that patch's semantic token,
  Linear(D -> P*P*6*d)(SiLU(s_i)) split per pixel, not one vector per image; so the global layout that the
  semantic stream settled decides how every pixel is refined;
* token compaction: attention does not run over H*W pixel tokens. The P*P pixel tokens of a patch are
  flattened and projected to one D-wide token (a learned Linear, P*P*d -> D), attention runs over the n
  patch tokens with the semantic stream's 2-D RoPE, and the result is projected back to the pixels
  (D -> P*P*d). The MLP then acts on each pixel token alone.

Modulation is x * (1 + scale) + shift throughout (models/layers.py) and every gate and the output head start
at zero, so a fresh pixel stream is the identity and the model outputs zero, as DiT's adaLN-Zero does.

The semantic stream is an existing model built with `with_head=False`, whose `features` this model reads:
PixelDiT uses a ccDiT (class labels) or an mmDiT (captions, cross-attention); MM-PixelDiT a JointDiT (joint
attention with registers, class or text). Conditioning therefore reaches the pixels only through s, and through
the conditioning vector c added to it (the time, and the class where there is one).
"""

import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Float
from torch import Tensor, nn

from models.attention import SelfAttention
from models.base import DiffusionTransformer, family_config
from models.ccdit import CCDiT
from models.config import ModelConfig
from models.joint_dit import JointDiT
from models.layers import Mlp, init_linears_xavier, layer_norm, modulate_per_token
from models.mmdit import MMDiT
from models.rope import grid_rope


class PixelBlock(nn.Module):
    """One PiT block: x += g1 * expand(Attn(compact(mod(LN x)))); x += g2 * MLP(mod(LN x)), pixel-wise."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, pixels = cfg.pixel_dim, cfg.patch**2
        self.pixels = pixels
        self.adaLN = nn.Linear(cfg.dim, pixels * 6 * d)  # pixel-wise modulation from the semantic token
        self.norm1 = layer_norm(d)
        self.compact = nn.Linear(pixels * d, cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.qk_norm)
        self.expand = nn.Linear(cfg.dim, pixels * d)
        self.norm2 = layer_norm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))

    def forward(
        self, x: Float[Tensor, "b n q d"], s: Float[Tensor, "b n D"], rope: Tensor | None
    ) -> Float[Tensor, "b n q d"]:
        mod = rearrange(self.adaLN(F.silu(s)), "b n (q six d) -> six b n q d", q=self.pixels, six=6)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        h = modulate_per_token(self.norm1(x), shift1, scale1)
        h = self.compact(rearrange(h, "b n q d -> b n (q d)"))  # one token per patch for attention
        h = rearrange(self.expand(self.attn(h, rope)), "b n (q d) -> b n q d", q=self.pixels)
        x = x + gate1 * h
        return x + gate2 * self.mlp(modulate_per_token(self.norm2(x), shift2, scale2))

    def zero_init(self) -> None:
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)


class PixelOutput(nn.Module):
    """LayerNorm -> pixel-wise modulation (shift, scale from the semantic token) -> Linear(d -> channels)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.pixels = cfg.pixel_dim, cfg.patch**2
        self.norm = layer_norm(d)
        self.adaLN = nn.Linear(cfg.dim, self.pixels * 2 * d)
        self.linear = nn.Linear(d, cfg.out_channels)

    def forward(self, x: Float[Tensor, "b n q d"], s: Float[Tensor, "b n D"]) -> Float[Tensor, "b n q c"]:
        shift, scale = rearrange(self.adaLN(F.silu(s)), "b n (q two d) -> two b n q d", q=self.pixels, two=2)
        return self.linear(modulate_per_token(self.norm(x), shift, scale))

    def zero_init(self) -> None:
        for layer in (self.adaLN, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)


SEMANTIC_STREAMS = {("pixeldit", "class"): ("ccdit", CCDiT), ("pixeldit", "text"): ("mmdit", MMDiT),
                    ("mmpixeldit", "class"): ("jointdit", JointDiT), ("mmpixeldit", "text"): ("jointdit", JointDiT)}


class PixelDiT(DiffusionTransformer):
    """PixelDiT (family pixeldit) and MM-PixelDiT (family mmpixeldit); conditioned like the semantic stream's
    model: model(x, t, labels=...) or model(x, t, text=..., text_mask=...). Its `blocks` are the semantic
    stream's blocks, then the pixel blocks."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = family_config(cfg, type(self), "pixeldit", "mmpixeldit")
        family, stream = SEMANTIC_STREAMS[cfg.family, cfg.conditioning]
        self.semantic = stream(ModelConfig(**cfg.to_dict() | dict(family=family)), with_head=False)
        self.cond_proj = nn.Linear(cfg.cond_dim, cfg.dim)  # c (time, class) joins s before the pixel stream
        self.pixel_embed = nn.Linear(cfg.in_channels, cfg.pixel_dim)
        self.pixel_blocks = nn.ModuleList(PixelBlock(cfg) for _ in range(cfg.pixel_depth))
        self.out = PixelOutput(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # The semantic stream initialised itself (xavier, then its adaLN-Zero); only the new parts here.
        for module in (self.cond_proj, self.pixel_embed, self.pixel_blocks, self.out):
            init_linears_xavier(module)
        for block in self.pixel_blocks:
            block.zero_init()
        self.out.zero_init()

    @property
    def prepared_keys(self) -> tuple[str, ...]:
        return self.semantic.prepared_keys

    def prepare_condition(self, **cond: Tensor) -> dict[str, Tensor]:
        """The semantic stream's prepared conditioning (an mmDiT's caption keys and values), if it has one."""
        prepare = getattr(self.semantic, "prepare_condition", None)
        return prepare(**cond) if prepare is not None else cond

    @property
    def blocks(self) -> tuple[nn.Module, ...]:
        # A view, not a registered module: the parameters keep their names under semantic. and pixel_blocks.
        return (*self.semantic.blocks, *self.pixel_blocks)

    def features(
        self, x: Float[Tensor, "b c H W"], t: Float[Tensor, " b"], **cond: Tensor
    ) -> tuple[Float[Tensor, "b n q d"], Float[Tensor, "b n D"]]:
        """The last pixel block's tokens (n patches of q = P*P pixels) and the semantic tokens that modulate
        the output head pixel by pixel."""
        p = self.config.patch
        s, c = self.semantic.features(x, t, **cond)  # s: b n D over the (H/p) x (W/p) patch grid
        s = s + self.cond_proj(c)[:, None]
        pixels = rearrange(x, "b c (h p) (w q) -> b (h w) (p q) c", p=p, q=p)
        h = self.pixel_embed(pixels.to(s.dtype))  # b n (p q) d
        rope = grid_rope(self.config, x)  # None unless config.rope
        for block in self.pixel_blocks:
            h = block(h, s, rope)
        return h, s

    def head(
        self, tokens: Float[Tensor, "b n q d"], modulation: Float[Tensor, "b n D"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        p = self.config.patch
        out = self.out(tokens, modulation)
        return rearrange(out, "b (h w) (p q) c -> b c (h p) (w q)", h=size[0] // p, p=p, q=p)
