"""Attention with per-head QK-RMSNorm through F.scaled_dot_product_attention (self, cross, joint).

QK-norm keeps attention logits bounded when training in low precision at large width
[dehghani2023vit22b, esser2024sd3]. Boolean masks follow SDPA's convention: True = may attend.

Masks and kernels. SDPA's FlashAttention-2 kernel takes no mask at all (PyTorch's sdp_utils.cpp lists
`check_for_attn_mask` among flash's constraints), so a mask is passed only where something is masked: never for
self-attention, and in joint attention only for caption tokens (a class token and the registers are always
visible). A caption's padding differs per sample and is known only on the device (reading it back would stall the
step), so caption masks stay; with one, SDPA on CUDA takes its memory-efficient (or cuDNN) kernel, which is fused
and accepts any mask. Packing the captions without padding (variable-length flash attention) would bring flash to
the text models too; it is not done here.
"""

import torch
import torch.nn.functional as F
from einops import rearrange
from jaxtyping import Bool, Float
from torch import Tensor, nn

from models.rope import apply_rope


class QKNorm(nn.Module):
    """Per-head RMSNorm for queries and keys (a learnable gain of size head_dim each)."""

    def __init__(self, head_dim: int, enabled: bool = True):
        super().__init__()
        self.q = nn.RMSNorm(head_dim, eps=1e-6) if enabled else nn.Identity()
        self.k = nn.RMSNorm(head_dim, eps=1e-6) if enabled else nn.Identity()

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.q(q), self.k(k)


def attend(
    q: Float[Tensor, "b h n e"],
    k: Float[Tensor, "b h m e"],
    v: Float[Tensor, "b h m e"],
    key_mask: Bool[Tensor, "b m"] | None = None,
) -> Float[Tensor, "b n h*e"]:
    """SDPA over heads; `key_mask` hides padded keys. Every row must keep at least one key."""
    mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return rearrange(out, "b h n e -> b n (h e)")


def padded_length(n: int, multiple: int) -> int:
    """n rounded up to a multiple of `multiple`."""
    return -(-n // multiple) * multiple


def pad_sequence(
    x: Float[Tensor, "b l e"], mask: Bool[Tensor, "b l"], length: int
) -> tuple[Float[Tensor, "b m e"], Bool[Tensor, "b m"]]:
    """`x` with zero rows appended up to `length` rows, and `mask` with False for them, so no query ever
    attends to them; both returned as they are when already `length` long."""
    pad = length - x.shape[1]
    if pad < 0:
        raise ValueError(f"cannot pad a sequence of {x.shape[1]} to {length}")
    if pad == 0:
        return x, mask
    return torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1), torch.cat(
        [mask, mask.new_zeros(mask.shape[0], pad)], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Float[Tensor, "b n d"], rope: Float[Tensor, "n half"] | None = None) -> Float[Tensor, "b n d"]:
        """`rope`: 2-D RoPE angles for the tokens (models/rope.py), applied after the QK-norm."""
        q, k, v = rearrange(self.qkv(x), "b n (three h e) -> three b h n e", three=3, h=self.heads)
        q, k = self.norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        return self.proj(attend(q, k, v))


class CrossAttention(nn.Module):
    """Image queries attend to text tokens: q from the image width, k and v from the encoder width."""

    def __init__(self, dim: int, context_dim: int, heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.norm = QKNorm(dim // heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def context_kv(self, context: Float[Tensor, "b m c"]) -> tuple[Float[Tensor, "b h m e"], Float[Tensor, "b h m e"]]:
        """The keys (QK-normed) and values of a context: they depend on the context alone, so a sampler that
        reads the same captions at every ODE step computes them once (MMDiT.prepare_condition)."""
        k, v = rearrange(self.kv(context), "b m (two h e) -> two b h m e", two=2, h=self.heads)
        return self.norm.k(k), v

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        context: Float[Tensor, "b m c"] | None,
        context_mask: Bool[Tensor, "b m"],
        kv: Float[Tensor, "b 2 h m e"] | None = None,
    ) -> Float[Tensor, "b n d"]:
        """Attend from x to `context`, or to its precomputed `kv` (context_kv)."""
        q = self.norm.q(rearrange(self.q(x), "b n (h e) -> b h n e", h=self.heads))
        k, v = self.context_kv(context) if kv is None else kv.unbind(1)
        return self.proj(attend(q, k, v, context_mask))


class JointAttention(nn.Module):
    """SD3's MM-DiT attention [esser2024sd3]: two streams with their own projections and QK-norms,
    one softmax over the concatenated sequence [context; image].

    With `context_out=False` (the last block) the context stream only supplies keys and values, so it
    has no output projection: an unused parameter would break DDP's gradient bookkeeping.
    """

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, context_out: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads, qk_norm)
        self.proj = nn.Linear(dim, dim)
        self.context_qkv = nn.Linear(dim, 3 * dim)
        self.context_norm = QKNorm(dim // heads, qk_norm)
        self.context_proj = nn.Linear(dim, dim) if context_out else None

    def forward(
        self,
        x: Float[Tensor, "b n d"],
        context: Float[Tensor, "b m d"],
        context_mask: Bool[Tensor, "b m"] | None,
        rope: Float[Tensor, "n half"] | None = None,
    ) -> tuple[Float[Tensor, "b n d"], Float[Tensor, "b m d"] | None]:
        """`rope` rotates the image tokens only: text and registers have no place on the grid. `context_mask`
        None: every context token is visible, and SDPA gets no mask (its flash kernel may run)."""
        split = "b n (three h e) -> three b h n e"
        q, k, v = rearrange(self.qkv(x), split, three=3, h=self.heads)
        cq, ck, cv = rearrange(self.context_qkv(context), split, three=3, h=self.heads)
        q, k = self.norm(q, k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        cq, ck = self.context_norm(cq, ck)
        m, key_mask = context.shape[1], None
        if context_mask is not None:
            image_mask = context_mask.new_ones(x.shape[0], x.shape[1])
            key_mask = torch.cat([context_mask, image_mask], dim=1)
        queries = torch.cat([cq, q], dim=2) if self.context_proj is not None else q
        out = attend(queries, torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2), key_mask)
        if self.context_proj is None:
            return self.proj(out), None
        return self.proj(out[:, m:]), self.context_proj(out[:, :m])
