"""PixArt: PixArt-alpha's transformer [chen2023pixartalpha] exactly as diffusers' PixArtTransformer2DModel computes
it [vonplaten2022diffusers], trained with this repo's loop and exported to stock diffusers by renaming alone
(`python -m app.export --format pixart`; models/conversion.py: pixart_to_diffusers).

Where it differs from the mmDiT (models/mmdit.py), each for the stock model's sake:

* no QK-norm, no RoPE, no learned null token: a dropped caption is an all-False mask, which diffusers turns into an
  additive bias of -10000 on every key (so the row attends uniformly to the masked, zero, tokens: a function of t
  alone) instead of SDPA's boolean mask, which would leave such a row NaN;
* adaLN-single behind a timestep MLP: emb(t) = TimestepEmbedding(sinusoid_256(1000 (1 - t))), the blocks read
  s(t) = Linear(SiLU(emb(t))) plus their own table, and the final layer is modulated by its table plus emb(t)
  itself (no MLP of its own);
* positions are diffusers' sin-cos table: [column | row] halves, each axis stepped by base_size / its own length /
  interpolation_scale (models/config.py: interpolation_scale);
* the feed-forward is PixArt-alpha's GELU-tanh MLP (or SiLU, diffusers' activation_fn="linear-silu"), and an
  optional caption MLP projects the encoder's tokens first (diffusers' caption_projection);
* time and sign: diffusers counts timestep = 1000 sigma with sigma = 1 - t the noise level, and its flow models
  predict noise - data, the negative of this repo's velocity data - noise. The network here IS diffusers' network
  on those conventions; `forward(x, t)` feeds it 1 - t and negates its output, so it trains and samples like every
  other family while its weights stay diffusers' own.

Initialisation follows the repo's adaLN-Zero (every gate, modulation table and output projection zero, so a fresh
model outputs zero), not PixArt-alpha's random tables.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.attention import CrossAttention, SelfAttention
from models.base import DiffusionTransformer, family_config
from models.config import PIXART_TIME_CHANNELS, ModelConfig
from models.embeddings import PatchEmbed, timestep_embedding, token_grid, unpatchify
from models.layers import (
    PREPARED_KEYS,
    AdaLNModulation,
    Mlp,
    block_captions,
    init_dit_weights,
    layer_norm,
    modulate,
    pad_to_multiple,
    prepare_captions,
)

MASK_BIAS = -10000.0
"""What diffusers adds to the attention logits of a masked caption token (PixArtTransformer2DModel.forward)."""


def pixart_positions(
    dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float, device=None
) -> Float[Tensor, "n dim"]:
    """diffusers' get_2d_sincos_pos_embed, rows first (n = grid_h * grid_w): the first half of the channels encode
    the column, the second the row, each as [sin | cos]; axis positions arange(len) / (len / base_size) /
    interpolation_scale in float32, frequencies in float64, as diffusers computes them."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embedding needs dim divisible by 4, got {dim}")
    ys = torch.arange(grid_h, device=device, dtype=torch.float32) / (grid_h / base_size) / interpolation_scale
    xs = torch.arange(grid_w, device=device, dtype=torch.float32) / (grid_w / base_size) / interpolation_scale
    omega = torch.arange(dim // 4, device=device, dtype=torch.float64) / (dim / 4.0)
    omega = 1.0 / 10_000**omega

    def encode(pos: Tensor) -> Tensor:  # [g] -> [g, dim/2]
        angles = torch.outer(pos, omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)

    emb_x = encode(xs)[None, :, :].expand(grid_h, grid_w, dim // 2)
    emb_y = encode(ys)[:, None, :].expand(grid_h, grid_w, dim // 2)
    return rearrange(torch.cat([emb_x, emb_y], dim=-1), "h w d -> (h w) d").float()


def diffusers_position_scale(cfg: ModelConfig) -> tuple[int, float]:
    """(base_size, interpolation_scale) of the diffusers PatchEmbed whose positions are this model's: diffusers'
    base grid is sample_size // patch_size, this repo keeps `base_grid` across resolutions, so the scale absorbs
    the ratio (at base_grid, positions step by 1 / cfg.interpolation_scale in both)."""
    base_size = cfg.input_size // cfg.patch
    return base_size, cfg.interpolation_scale * base_size / cfg.base_grid


class PixArtPatchEmbed(PatchEmbed):
    """The patch conv with diffusers' position table instead of this repo's [row | col] one."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.in_channels, cfg.dim, cfg.patch, cfg.base_grid)
        self.base_size, self.interpolation_scale = diffusers_position_scale(cfg)

    def position_table(self, grid_h: int, grid_w: int, device) -> Float[Tensor, "n dim"]:
        return pixart_positions(self.proj.out_channels, grid_h, grid_w, self.base_size, self.interpolation_scale,
                                device)


class PixArtTimestep(nn.Module):
    """t (0 noise .. 1 data) -> diffusers' Timesteps(256, flip_sin_to_cos=True) of timestep = 1000 (1 - t)."""

    def __init__(self, time_scale: float):
        super().__init__()
        self.time_scale = time_scale

    def forward(self, t: Float[Tensor, " b"]) -> Float[Tensor, "b c"]:
        return timestep_embedding((1 - t) * self.time_scale, PIXART_TIME_CHANNELS)


class CaptionProjection(nn.Module):
    """PixArt-alpha's caption MLP: Linear -> GELU(tanh) -> Linear (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, text_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, text: Float[Tensor, "b l e"]) -> Float[Tensor, "b l d"]:
        return self.fc2(self.act(self.fc1(text)))


class BiasedCrossAttention(CrossAttention):
    """Cross-attention with diffusers' mask: an additive -10000 on masked keys (so an all-masked row is defined)."""

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        context: Float[Tensor, "b m c"] | None,
        context_mask: Bool[Tensor, "b m"],
        kv: Float[Tensor, "b 2 h m e"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        q = rearrange(self.q(x), "b n (h e) -> b h n e", h=self.heads)  # no QK-norm here (qk_norm is off)
        k, v = self.context_kv(context) if kv is None else kv.unbind(1)
        bias = (~context_mask)[:, None, None, :].to(q.dtype) * MASK_BIAS  # b 1 1 m, over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(rearrange(out, "b h n e -> b n (h e)"))


class PixArtBlock(nn.Module):
    """diffusers' BasicTransformerBlock(norm_type="ada_norm_single"): gated self-attention, un-gated
    cross-attention on the un-normalised tokens, gated MLP; modulation s(t) + scale_shift_table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        context = cfg.dim if cfg.caption_projection else cfg.text_dim
        self.scale_shift_table = nn.Parameter(torch.zeros(6, cfg.dim))
        self.norm1 = layer_norm(cfg.dim)
        self.attn = SelfAttention(cfg.dim, cfg.heads, qk_norm=False)
        self.cross_attn = BiasedCrossAttention(cfg.dim, context, cfg.heads, qk_norm=False)
        self.norm2 = layer_norm(cfg.dim)
        self.mlp = Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio))
        if cfg.activation == "gelu_tanh":
            self.mlp.act = nn.GELU(approximate="tanh")

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        s: Float[Tensor, "b m"],
        text: Float[Tensor, "b l e"] | None,
        text_mask: Bool[Tensor, "b l"],
        text_kv: Float[Tensor, "b 2 h l e2"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """`text`: the caption keys (PixArt.caption_keys), or None with `text_kv`, this block's prepared keys and
        values (prepare_condition)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (s + self.scale_shift_table.flatten()).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(x, text, text_mask, text_kv)  # un-gated, on the un-normalised tokens
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class PixArtFinalLayer(nn.Module):
    """LayerNorm -> modulate by (scale_shift_table + emb(t)) -> Linear -> the image: no modulation MLP of its own."""

    def __init__(self, dim: int, patch: int, channels: int):
        super().__init__()
        self.patch, self.channels = patch, channels
        self.norm = layer_norm(dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, patch**2 * channels)

    def forward(
        self, x: Float[Tensor, "b n d"], emb: Float[Tensor, "b d"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(1)  # each b d
        patches = self.linear(modulate(self.norm(x), shift, scale))  # b n (p p o)
        return unpatchify(patches, self.patch, self.channels, *token_grid(size, self.patch))

    def zero_init(self) -> None:
        for p in (self.scale_shift_table, self.linear.weight, self.linear.bias):
            nn.init.zeros_(p)


class PixArt(DiffusionTransformer):
    """Called as model(x, t, text=..., text_mask=...) with this repo's t and velocity; see the module docstring.
    A sampler may call `prepare_condition(text, text_mask)` once, as for the mmDiT."""

    prepared_keys = PREPARED_KEYS

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = family_config(cfg, type(self), "pixart")
        # The draws of a patch conv that pixart models have always built first and thrown away (the DiT's, replaced
        # by diffusers' below), kept so that a seeded initialisation is what it was.
        nn.Conv2d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch, stride=cfg.patch)
        self.patch_embed = PixArtPatchEmbed(cfg)
        self.t_embed = PixArtTimestep(cfg.time_scale)
        self.t_embedder = AdaLNModulation(PIXART_TIME_CHANNELS, cfg.dim, chunks=1)  # diffusers' TimestepEmbedding
        self.t_block = nn.Linear(cfg.dim, 6 * cfg.dim)  # adaLN-single: s(t) = t_block(SiLU(emb(t)))
        self.caption_projection = CaptionProjection(cfg.text_dim, cfg.dim) if cfg.caption_projection else None
        self.blocks = nn.ModuleList(PixArtBlock(cfg) for _ in range(cfg.depth))
        self.initialize_weights()
        # Built after the xavier pass (it starts at zero anyway), so its construction's draws come last.
        self.final = PixArtFinalLayer(cfg.dim, cfg.patch, cfg.out_channels)
        self.final.zero_init()

    def initialize_weights(self) -> None:
        """DiT's xavier pass, then PixArt-alpha's draws for its embedding MLPs, and adaLN-Zero for everything that
        modulates or adds to x (the output layer is zeroed where it is built)."""
        init_dit_weights(self, self.patch_embed.proj)
        for linear in (self.t_embedder.fc1, self.t_embedder.fc2):
            nn.init.normal_(linear.weight, std=0.02)
        if self.caption_projection is not None:
            for linear in (self.caption_projection.fc1, self.caption_projection.fc2):
                nn.init.normal_(linear.weight, std=0.02)
        nn.init.zeros_(self.t_block.weight)
        nn.init.zeros_(self.t_block.bias)
        for block in self.blocks:
            nn.init.zeros_(block.scale_shift_table)
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)

    def features(
        self,
        x: Float[Tensor, "b c H W"],
        t: Float[Tensor, " b"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b _"] | None = None,
        text_kv: Float[Tensor, "b depth 2 h m e2"] | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b d"]]:
        """The last block's tokens, and emb(t), which modulates the output layer. The caption comes as text and
        text_mask, or prepared (`prepare_condition`) as text_kv and the mask over its keys."""
        h = self.patch_embed(x)  # b n d, diffusers' positions added (no RoPE)
        emb = self.t_embedder(self.t_embed(t).to(h.dtype))  # TimestepEmbedding(sinusoid(1000 (1 - t)))
        s = self.t_block(F.silu(emb))  # adaLN-single: s(t), one for every block
        keys, mask, kvs = block_captions(self.caption_keys, len(self.blocks), text, text_mask, text_kv)
        for block, kv in zip(self.blocks, kvs, strict=True):
            h = block(h, s, keys, mask, kv)
        return h, emb

    def head(
        self, tokens: Float[Tensor, "b n d"], emb: Float[Tensor, "b d"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        """diffusers' output (noise - data), negated: this repo's velocity (data - noise)."""
        return -self.final(tokens, emb, size)

    def caption_keys(
        self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]
    ) -> tuple[Float[Tensor, "b m c"], Bool[Tensor, "b m"]]:
        """What cross-attention reads: the (projected) caption, padded with masked rows to text_pad_multiple."""
        if self.caption_projection is not None:
            text = self.caption_projection(text)
        return pad_to_multiple(text, text_mask.bool(), self.config.text_pad_multiple)

    def prepare_condition(self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]) -> dict[str, Tensor]:
        """The caption's keys and values in every block, computed once for all the steps of a sampler (as MMDiT's)."""
        return prepare_captions(self.blocks, *self.caption_keys(text, text_mask))
