"""Plain float64 forwards of ccDiT, mmDiT, JointDiT, PixelDiT and MM-PixelDiT, written from the papers' equations,
for tests/test_reference_models.py.

Nothing here comes from models/: a forward reads only the model's ModelConfig fields (sizes and switches) and its
state_dict, by name, and computes with torch primitives (matmul, softmax, exp, sin, cos, complex products) in
float64. The equations:

* DiT with adaLN-Zero [peebles2023]: c = sinusoid(t) (+ the class row); per block (shift1, scale1, gate1, shift2,
  scale2, gate2) = W2 SiLU(W1 c + b1) + b2, x += gate1 Attn(LN(x)(1 + scale1) + shift1), x += gate2 MLP(...);
  the output layer LN(x)(1 + scale) + shift -> Linear -> the patch's pixels;
* PixArt-alpha's adaLN-single with cross-attention [chen2023pixartalpha]: one shared MLP s(t), block i reads
  s(t) + E_i, and an un-gated cross-attention to the caption [null; text] runs between the gated pair;
* SD3's joint attention [esser2024sd3]: image and context streams with their own modulation, projections,
  QK-norms and MLPs, one softmax over both; the last block's context stream only supplies keys and values;
  registers [darcet2024registers] lead the context;
* PixelDiT's pixel stream [pixeldit2025]: per-pixel tokens modulated pixel by pixel from their patch's semantic
  token, attention over one compacted token per patch, a per-pixel output head;
* attention softmax(q k^T / sqrt(e)) v with per-head RMSNorm on q and k [dehghani2023vit22b]; 2-D axial RoPE
  [su2021rope] as a complex rotation of channel pairs; the 2-D sin-cos table of [row | column] halves, each
  [sin | cos]; learned positions resized by bicubic convolution [keys1981cubic] (a = -0.75, half-pixel centres,
  edges repeated, as torch's bicubic interpolation defines it).

What the equations leave open is the repo's layout of the weights, stated here once: a qkv Linear's output is
[q | k | v] and a cross-attention's kv [k | v], each [head 0 | head 1 | ...]; a modulation vector is the six (or two)
chunks in the order above; the patch conv's weight is [D, C, p, p] and the output Linear gives a patch's pixels in
(row, column, channel) order; a pixel-wise modulation Linear gives, per pixel of the patch, its six (or two) chunks
of width d; token (i, j) of an h x w grid sits at (i G / h, j G / w) in base-grid units G (ModelConfig.base_grid);
a RoPE head rotates its first e/4 channel pairs by the row, the rest by the column.
"""

import math

import torch
from torch import Tensor

Weights = dict[str, Tensor]

EPS = 1e-6
"""LayerNorm and RMSNorm epsilon."""


# ---- primitives ------------------------------------------------------------------------------------------------


def dense(w: Weights, name: str, x: Tensor) -> Tensor:
    return x @ w[f"{name}.weight"].T + w[f"{name}.bias"]


def silu(x: Tensor) -> Tensor:
    return x / (1 + torch.exp(-x))


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm over the last axis without a gain or bias (adaLN supplies them)."""
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.square().mean(-1, keepdim=True) + EPS)


def rms_norm(x: Tensor, gain: Tensor) -> Tensor:
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS) * gain


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def mlp(w: Weights, name: str, x: Tensor) -> Tensor:
    return dense(w, f"{name}.fc2", silu(dense(w, f"{name}.fc1", x)))


def chunks(v: Tensor, n: int) -> list[Tensor]:
    """A [b, n * d] modulation vector as n tensors [b, 1, d] (broadcast over tokens)."""
    d = v.shape[-1] // n
    return [v[:, None, i * d : (i + 1) * d] for i in range(n)]


def split_heads(x: Tensor, heads: int) -> Tensor:
    b, n, width = x.shape
    return x.reshape(b, n, heads, width // heads).transpose(1, 2)  # b h n e


def merge_heads(x: Tensor) -> Tensor:
    b, h, n, e = x.shape
    return x.transpose(1, 2).reshape(b, n, h * e)


def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(e)) v over heads; key_mask [b, m] True = may attend."""
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1) @ v


def qk_norm(w: Weights, name: str, cfg, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    if not cfg.qk_norm:
        return q, k
    return rms_norm(q, w[f"{name}.q.weight"]), rms_norm(k, w[f"{name}.k.weight"])


# ---- positions and time --------------------------------------------------------------------------------------


def axis_positions(length: int, base_grid: int) -> Tensor:
    """Positions along one axis in base-grid units: every axis spans [0, base_grid)."""
    return torch.arange(length, dtype=torch.float64) * base_grid / length


def sincos_table(dim: int, grid_h: int, grid_w: int, base_grid: int) -> Tensor:
    """[grid_h * grid_w, dim], rows first: [sin(y w) | cos(y w) | sin(x w) | cos(x w)], w_i = 10000^(-4i/dim)."""
    omega = 10_000.0 ** (-torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    y = axis_positions(grid_h, base_grid)[:, None, None] * omega  # h 1 q
    x = axis_positions(grid_w, base_grid)[None, :, None] * omega  # 1 w q
    y, x = y.expand(grid_h, grid_w, -1), x.expand(grid_h, grid_w, -1)
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1).reshape(grid_h * grid_w, dim)


def rope_rotations(head_dim: int, grid_h: int, grid_w: int, base_grid: int, theta: float) -> Tensor:
    """Unit complex numbers [n, head_dim / 2]: pair i < head_dim/4 turns by y theta^(-4i/head_dim), the rest by x."""
    quarter = head_dim // 4
    omega = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
    y = axis_positions(grid_h, base_grid)[:, None, None] * omega
    x = axis_positions(grid_w, base_grid)[None, :, None] * omega
    angles = torch.cat([y.expand(grid_h, grid_w, -1), x.expand(grid_h, grid_w, -1)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles).reshape(grid_h * grid_w, 2 * quarter)


def rotate(x: Tensor, rotations: Tensor | None) -> Tensor:
    """Channel pairs (2i, 2i+1) of the last n tokens of x [b, h, m, e] as complex numbers, times the rotations."""
    if rotations is None:
        return x
    n = rotations.shape[0]
    head, tail = x[..., : x.shape[-2] - n, :], x[..., x.shape[-2] - n :, :]
    turned = torch.view_as_real(torch.view_as_complex(tail.reshape(*tail.shape[:-1], -1, 2)) * rotations)
    return torch.cat([head, turned.reshape(tail.shape)], dim=-2)


def cubic(s: Tensor, a: float = -0.75) -> Tensor:
    """The cubic convolution kernel at distance s [keys1981cubic]."""
    s = s.abs()
    near = (a + 2) * s**3 - (a + 3) * s**2 + 1
    far = a * s**3 - 5 * a * s**2 + 8 * a * s - 4 * a
    return torch.where(s <= 1, near, torch.where(s < 2, far, torch.zeros_like(s)))


def bicubic_matrix(size_out: int, size_in: int) -> Tensor:
    """[size_out, size_in]: output sample i reads input (i + 1/2) size_in / size_out - 1/2 from its 4 neighbours,
    indices past an edge repeating the edge."""
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    for i in range(size_out):
        src = (i + 0.5) * size_in / size_out - 0.5
        left = math.floor(src)
        for j in range(left - 1, left + 3):
            m[i, min(max(j, 0), size_in - 1)] += cubic(torch.tensor(src - j, dtype=torch.float64))
    return m


def resize_table(table: Tensor, base_grid: int, grid_h: int, grid_w: int) -> Tensor:
    grid = table.reshape(base_grid, base_grid, -1)
    rows, cols = bicubic_matrix(grid_h, base_grid), bicubic_matrix(grid_w, base_grid)
    return torch.einsum("hH,HWd,wW->hwd", rows, grid, cols).reshape(grid_h * grid_w, -1)


def time_sinusoid(t: Tensor, dim: int, time_scale: float) -> Tensor:
    """[cos | sin] of (t time_scale) f_i, f_i = 10000^(-i / (dim/2)) [vaswani2017, peebles2023]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half)
    angles = (t.double() * time_scale)[:, None] * freqs
    out = torch.cat([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([out, torch.zeros_like(out[:, :1])], dim=-1) if dim % 2 else out


# ---- patches ---------------------------------------------------------------------------------------------------


def patch_tokens(w: Weights, prefix: str, cfg, x: Tensor) -> Tensor:
    """The patch conv as a matrix over each patch's (channel, row, column) values, plus the positions."""
    b, c, height, width = x.shape
    p, gh, gw = cfg.patch, height // cfg.patch, width // cfg.patch
    patches = x.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, gh * gw, c * p * p)
    weight = w[f"{prefix}patch_embed.proj.weight"]
    tokens = patches @ weight.reshape(weight.shape[0], -1).T + w[f"{prefix}patch_embed.proj.bias"]
    if cfg.pos_embed == "learned":
        table = w[f"{prefix}patch_embed.positions"]
        same = (gh, gw) == (cfg.base_grid, cfg.base_grid)
        return tokens + (table if same else resize_table(table, cfg.base_grid, gh, gw))
    return tokens + sincos_table(cfg.dim, gh, gw, cfg.base_grid)


def image_from_patches(out: Tensor, p: int, channels: int, grid_h: int, grid_w: int) -> Tensor:
    b = out.shape[0]
    return out.reshape(b, grid_h, grid_w, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(
        b, channels, grid_h * p, grid_w * p)


def rope_for(cfg, grid_h: int, grid_w: int) -> Tensor | None:
    return rope_rotations(cfg.dim // cfg.heads, grid_h, grid_w, cfg.base_grid, cfg.rope_theta) if cfg.rope else None


# ---- blocks ----------------------------------------------------------------------------------------------------


def self_attention(w: Weights, name: str, cfg, x: Tensor, rot: Tensor | None) -> Tensor:
    d = x.shape[-1]
    qkv = dense(w, f"{name}.qkv", x)
    q, k, v = (split_heads(qkv[..., i * d : (i + 1) * d], cfg.heads) for i in range(3))
    q, k = qk_norm(w, f"{name}.norm", cfg, q, k)
    return dense(w, f"{name}.proj", merge_heads(attention(rotate(q, rot), rotate(k, rot), v)))


def cross_attention(w: Weights, name: str, cfg, x: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
    d = x.shape[-1]
    q = split_heads(dense(w, f"{name}.q", x), cfg.heads)
    kv = dense(w, f"{name}.kv", keys)
    k, v = split_heads(kv[..., :d], cfg.heads), split_heads(kv[..., d:], cfg.heads)
    q, k = qk_norm(w, f"{name}.norm", cfg, q, k)
    return dense(w, f"{name}.proj", merge_heads(attention(q, k, v, key_mask)))


def adaln(w: Weights, name: str, c: Tensor) -> Tensor:
    return dense(w, f"{name}.fc2", silu(dense(w, f"{name}.fc1", c)))


def dit_block(w: Weights, name: str, cfg, x: Tensor, mod: Tensor, rot: Tensor | None, cross=None) -> Tensor:
    """The gated pair, with PixArt's un-gated cross-attention between them when `cross` is given."""
    shift1, scale1, gate1, shift2, scale2, gate2 = chunks(mod, 6)
    x = x + gate1 * self_attention(w, f"{name}.attn", cfg, modulate(layer_norm(x), shift1, scale1), rot)
    if cross is not None:
        x = x + cross(x)
    return x + gate2 * mlp(w, f"{name}.mlp", modulate(layer_norm(x), shift2, scale2))


def ccdit_block(w: Weights, name: str, cfg, x: Tensor, c: Tensor, rot: Tensor | None = None) -> Tensor:
    return dit_block(w, name, cfg, x, adaln(w, f"{name}.adaLN", c), rot)


def mmdit_block(w: Weights, name: str, cfg, x: Tensor, s: Tensor, keys: Tensor, key_mask: Tensor,
                rot: Tensor | None = None) -> Tensor:
    """`keys`: the caption with the null token in front, [null; text], and its mask."""
    cross = lambda h: cross_attention(w, f"{name}.cross_attn", cfg, h, keys, key_mask)  # noqa: E731
    return dit_block(w, name, cfg, x, s + w[f"{name}.embedding"], rot, cross)


def jointdit_block(w: Weights, name: str, cfg, x: Tensor, ctx: Tensor, ctx_mask: Tensor, c: Tensor, last: bool,
                   rot: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One SD3 block; the image tokens go first in the joint sequence (the softmax does not care)."""
    d, n = x.shape[-1], x.shape[1]
    shift1, scale1, gate1, shift2, scale2, gate2 = chunks(adaln(w, f"{name}.adaLN", c), 6)
    cmod = chunks(adaln(w, f"{name}.context_adaLN", c), 2 if last else 6)
    xq, cq = dense(w, f"{name}.attn.qkv", modulate(layer_norm(x), shift1, scale1)), dense(
        w, f"{name}.attn.context_qkv", modulate(layer_norm(ctx), cmod[0], cmod[1]))
    q, k, v = (split_heads(xq[..., i * d : (i + 1) * d], cfg.heads) for i in range(3))
    q2, k2, v2 = (split_heads(cq[..., i * d : (i + 1) * d], cfg.heads) for i in range(3))
    q, k = qk_norm(w, f"{name}.attn.norm", cfg, q, k)
    q2, k2 = qk_norm(w, f"{name}.attn.context_norm", cfg, q2, k2)
    # RoPE on the image tokens only: rotate them as the tail of a sequence that holds nothing else.
    q, k = rotate(q, rot), rotate(k, rot)
    mask = torch.cat([torch.ones(x.shape[0], n, dtype=torch.bool), ctx_mask], dim=1)
    out = merge_heads(attention(torch.cat([q, q2], 2), torch.cat([k, k2], 2), torch.cat([v, v2], 2), mask))
    x = x + gate1 * dense(w, f"{name}.attn.proj", out[:, :n])
    x = x + gate2 * mlp(w, f"{name}.mlp", modulate(layer_norm(x), shift2, scale2))
    if last:
        return x, ctx
    _, _, cgate1, cshift2, cscale2, cgate2 = cmod
    ctx = ctx + cgate1 * dense(w, f"{name}.attn.context_proj", out[:, n:])
    ctx = ctx + cgate2 * mlp(w, f"{name}.context_mlp", modulate(layer_norm(ctx), cshift2, cscale2))
    return x, ctx


def pixel_block(w: Weights, name: str, cfg, x: Tensor, s: Tensor, rot: Tensor | None = None) -> Tensor:
    """x [b, n, P*P, d] pixel tokens, s [b, n, D] semantic tokens."""
    b, n, pixels, d = x.shape
    mod = dense(w, f"{name}.adaLN", silu(s)).reshape(b, n, pixels, 6, d)
    shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(3)
    h = modulate(layer_norm(x), shift1, scale1).reshape(b, n, pixels * d)
    h = dense(w, f"{name}.compact", h)  # one token per patch
    h = dense(w, f"{name}.expand", self_attention(w, f"{name}.attn", cfg, h, rot)).reshape(b, n, pixels, d)
    x = x + gate1 * h
    return x + gate2 * mlp(w, f"{name}.mlp", modulate(layer_norm(x), shift2, scale2))


def final_layer(w: Weights, name: str, x: Tensor, c: Tensor) -> Tensor:
    shift, scale = chunks(adaln(w, f"{name}.adaLN", c), 2)
    return dense(w, f"{name}.linear", modulate(layer_norm(x), shift, scale))


# ---- families ------------------------------------------------------------------------------------------------


def dit_features(w: Weights, cfg, family: str, x: Tensor, t: Tensor, prefix: str = "", **cond: Tensor):
    """(the last block's tokens, the vector the output layer is modulated with) of a ccDiT, mmDiT or JointDiT."""
    gh, gw = x.shape[-2] // cfg.patch, x.shape[-1] // cfg.patch
    h = patch_tokens(w, prefix, cfg, x)
    temb = time_sinusoid(t, cfg.cond_dim, cfg.time_scale)
    rot = rope_for(cfg, gh, gw)
    blocks = [f"{prefix}blocks.{i}" for i in range(cfg.depth)]
    if family == "ccdit":
        c = temb + w[f"{prefix}y_embed.table.weight"][cond["labels"]]
        for name in blocks:
            h = ccdit_block(w, name, cfg, h, c, rot)
        return h, c
    if family == "mmdit":
        b = x.shape[0]
        s = adaln(w, f"{prefix}t_block", temb)
        keys = torch.cat([w[f"{prefix}null_text"].expand(b, 1, -1), cond["text"].double()], dim=1)
        key_mask = torch.cat([torch.ones(b, 1, dtype=torch.bool), cond["text_mask"].bool()], dim=1)
        for name in blocks:
            h = mmdit_block(w, name, cfg, h, s, keys, key_mask, rot)
        return h, temb
    if family == "jointdit":
        b, c = x.shape[0], temb
        if cfg.conditioning == "class":
            y = w[f"{prefix}y_embed.table.weight"][cond["labels"]]
            c = temb + y
            tokens, mask = dense(w, f"{prefix}context_embed", y[:, None]), torch.ones(b, 1, dtype=torch.bool)
        else:
            tokens, mask = dense(w, f"{prefix}context_embed", cond["text"].double()), cond["text_mask"].bool()
        ctx = torch.cat([w[f"{prefix}registers"].expand(b, -1, -1), tokens], dim=1)
        ctx_mask = torch.cat([torch.ones(b, cfg.num_registers, dtype=torch.bool), mask], dim=1)
        for i, name in enumerate(blocks):
            h, ctx = jointdit_block(w, name, cfg, h, ctx, ctx_mask, c, i == cfg.depth - 1, rot)
        return h, c
    raise ValueError(family)


PIXEL_STREAMS = {("pixeldit", "class"): "ccdit", ("pixeldit", "text"): "mmdit", ("mmpixeldit", "class"): "jointdit",
                 ("mmpixeldit", "text"): "jointdit"}
"""The semantic stream of each pixel family [pixeldit2025]: a ccDiT, an mmDiT or a JointDiT without its head."""


def pixel_forward(w: Weights, cfg, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
    b, channels, height, width = x.shape
    p = cfg.patch
    gh, gw = height // p, width // p
    s, c = dit_features(w, cfg, PIXEL_STREAMS[cfg.family, cfg.conditioning], x, t, "semantic.", **cond)
    s = s + dense(w, "cond_proj", c)[:, None]
    pixels = x.double().reshape(b, channels, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p, -1)
    h = dense(w, "pixel_embed", pixels)
    rot = rope_for(cfg, gh, gw)
    for i in range(cfg.pixel_depth):
        h = pixel_block(w, f"pixel_blocks.{i}", cfg, h, s, rot)
    shift, scale = dense(w, "out.adaLN", silu(s)).reshape(b, gh * gw, p * p, 2, -1).unbind(3)
    out = dense(w, "out.linear", modulate(layer_norm(h), shift, scale))  # b n (p q) c
    return out.reshape(b, gh, gw, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(b, channels, height, width)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter of `model` (float64) drawn afresh, in name order: weights at 1/sqrt(fan-in), vectors at 0.5.
    adaLN-Zero leaves gates, heads and modulation tables at zero, where they would hide most of the network."""
    g = torch.Generator().manual_seed(seed)
    for _, p in sorted(model.named_parameters()):
        fan_in = p[0].numel() if p.dim() == 4 else p.shape[-1]
        std = fan_in**-0.5 if p.dim() >= 2 else 0.5
        p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * std)


def forward(state: Weights, cfg, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
    """The float64 prediction of the model with ModelConfig `cfg` and state_dict `state` at x [b, C, H, W], t [b]."""
    w = {k: v.double() for k, v in state.items()}
    x, t = x.double(), t.double()
    if cfg.family in ("pixeldit", "mmpixeldit"):
        return pixel_forward(w, cfg, x, t, **cond)
    h, c = dit_features(w, cfg, cfg.family, x, t, **cond)
    p = cfg.patch
    return image_from_patches(final_layer(w, "final", h, c), p, cfg.in_channels, x.shape[-2] // p, x.shape[-1] // p)
