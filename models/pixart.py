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

from models.attention import CrossAttention, SelfAttention, pad_sequence, padded_length
from models.base import DiTSkeleton
from models.config import PIXART_TIME_CHANNELS, ModelConfig
from models.embeddings import PatchEmbed, timestep_embedding, unpatchify
from models.layers import AdaLNModulation, Mlp, gated_block_forward, layer_norm, modulate

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

    def forward(self, t: Float[Tensor, "b"]) -> Float[Tensor, "b c"]:
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
        cross = lambda h: self.cross_attn(h, text, text_mask, text_kv)  # noqa: E731 (run between the gated pair)
        return gated_block_forward(self, x, s + self.scale_shift_table.flatten(), cross=cross)


class PixArtFinalLayer(nn.Module):
    """LayerNorm -> modulate by (scale_shift_table + emb(t)) -> Linear: no modulation MLP of its own."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = layer_norm(dim)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Float[Tensor, "b n d"], emb: Float[Tensor, "b d"]) -> Float[Tensor, "b n o"]:
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unbind(1)  # each b d
        return self.linear(modulate(self.norm(x), shift, scale))

    def zero_init(self) -> None:
        for p in (self.scale_shift_table, self.linear.weight, self.linear.bias):
            nn.init.zeros_(p)


class PixArt(DiTSkeleton):
    """Called as model(x, t, text=..., text_mask=...) with this repo's t and velocity; see the module docstring.
    A sampler may call `prepare_condition(text, text_mask)` once, as for the mmDiT."""

    family = "pixart"
    prepared_keys = ("text_kv", "text_mask")

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, with_head=False)
        self.final = PixArtFinalLayer(cfg.dim, cfg.patch**2 * cfg.out_channels)
        self.final.zero_init()

    def build_conditioning(self, cfg: ModelConfig) -> None:
        # The skeleton's patch embedding and sinusoid, swapped for diffusers' (same conv, so the same name and init).
        self.patch_embed = PixArtPatchEmbed(cfg)
        self.t_embed = PixArtTimestep(cfg.time_scale)
        self.t_embedder = AdaLNModulation(PIXART_TIME_CHANNELS, cfg.dim, chunks=1)  # diffusers' TimestepEmbedding
        self.t_block = nn.Linear(cfg.dim, 6 * cfg.dim)  # adaLN-single: s(t) = t_block(SiLU(emb(t)))
        self.caption_projection = CaptionProjection(cfg.text_dim, cfg.dim) if cfg.caption_projection else None

    def make_block(self, cfg: ModelConfig, index: int) -> PixArtBlock:
        return PixArtBlock(cfg)

    def init_conditioning(self) -> None:
        # PixArt-alpha's draws for its embedding MLPs; adaLN-Zero for everything that modulates or adds to x.
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

    def keys(
        self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]
    ) -> tuple[Float[Tensor, "b m c"], Bool[Tensor, "b m"]]:
        """What cross-attention reads: the (projected) caption, padded with masked rows to text_pad_multiple."""
        if self.caption_projection is not None:
            text = self.caption_projection(text)
        return pad_sequence(text, text_mask.bool(), padded_length(text.shape[1], self.config.text_pad_multiple))

    def prepare_condition(self, text: Float[Tensor, "b l e"], text_mask: Bool[Tensor, "b l"]) -> dict[str, Tensor]:
        """The captions' keys and values in every block, computed once for all the ODE steps (as MMDiT's)."""
        keys, mask = self.keys(text, text_mask)
        kv = torch.stack([torch.stack(block.cross_attn.context_kv(keys), dim=1) for block in self.blocks], dim=1)
        return dict(text_kv=kv, text_mask=mask)  # text_kv: b depth 2 h m e

    def condition(
        self,
        t_emb: Float[Tensor, "b c"],
        text: Float[Tensor, "b l e"] | None = None,
        text_mask: Bool[Tensor, "b l"] | None = None,
        text_kv: Float[Tensor, "b depth 2 h m e"] | None = None,
    ) -> tuple[Float[Tensor, "b d"], tuple]:
        """emb(t), which modulates the final layer, and (s(t), the caption keys or their prepared keys and values)."""
        emb = self.t_embedder(t_emb)
        s = self.t_block(F.silu(emb))
        if text_kv is not None:
            return emb, (s, None, text_mask.bool(), text_kv.unbind(1))
        text, text_mask = self.keys(text, text_mask)
        return emb, (s, text, text_mask, None)

    def run_block(self, block: PixArtBlock, h: Tensor, state: tuple, rope: Tensor | None) -> tuple[Tensor, tuple]:
        s, text, text_mask, kvs = state
        if kvs is None:
            return block(h, s, text, text_mask), state
        return block(h, s, None, text_mask, kvs[0]), (s, None, text_mask, kvs[1:])

    def head(
        self, tokens: Float[Tensor, "b n d"], modulation: Float[Tensor, "b d"], size: tuple[int, int]
    ) -> Float[Tensor, "b o H W"]:
        """diffusers' output (noise - data), negated: this repo's velocity (data - noise)."""
        p = self.config.patch
        out = unpatchify(self.final(tokens, modulation), p, self.config.out_channels, size[0] // p, size[1] // p)
        return -out
