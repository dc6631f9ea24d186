"""Shared blocks against independent float64 references: embeddings, patching, attention."""

import math

import numpy as np
import pytest
import torch

from models.attention import CrossAttention, SelfAttention
from models.embeddings import PatchEmbed, patchify, sincos_pos_embed_2d, timestep_embedding, unpatchify


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.25, 731.0])
    emb = timestep_embedding(t, 8)
    freqs = [10_000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs] for v in t.tolist()]
    torch.testing.assert_close(emb, torch.tensor(expected), rtol=0, atol=1e-4)


@pytest.mark.parametrize("patch, channels, h, w", [(2, 16, 8, 12), (4, 3, 32, 32)])
def test_patchify_unpatchify_round_trip(patch, channels, h, w):
    x = torch.randn(2, channels, h, w)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, (h // patch) * (w // patch), patch * patch * channels)
    assert torch.equal(unpatchify(tokens, patch, channels, h // patch, w // patch), x)
    # Token 1 is the second patch of the first row: pixel (0, patch) of channel c sits at c.
    assert torch.equal(tokens[0, 1, : channels], x[0, :, 0, patch])


def test_patch_conv_equals_linear_on_patchified_pixels():
    embed = PatchEmbed(in_channels=3, dim=8, patch=4, base_grid=4)
    x = torch.randn(2, 3, 16, 16)
    # Same weights as a matrix over the (p q c) patch layout.
    w = embed.proj.weight.permute(0, 2, 3, 1).reshape(8, -1)
    expected = patchify(x, 4) @ w.T + embed.proj.bias + sincos_pos_embed_2d(8, 4, 4, base_grid=4)
    torch.testing.assert_close(embed(x), expected, rtol=1e-5, atol=1e-5)


def numpy_sincos_2d(dim: int, grid: int) -> np.ndarray:
    """The MAE/DiT formula at integer positions, in float64: [sin y | cos y | sin x | cos x]."""
    omega = 1.0 / 10_000 ** (np.arange(dim // 4) / (dim // 4))
    ys, xs = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")

    def enc(p):
        a = p.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(a), np.cos(a)], axis=1)

    return np.concatenate([enc(ys), enc(xs)], axis=1)


def test_position_embedding_at_base_grid_matches_float64_formula():
    emb = sincos_pos_embed_2d(32, 6, 6, base_grid=6)
    np.testing.assert_allclose(emb.numpy(), numpy_sincos_2d(32, 6), atol=1e-6)


def test_position_embedding_interpolates_at_a_new_resolution():
    """Doubling the grid halves the position step: every other token lands on the base positions."""
    base = sincos_pos_embed_2d(32, 8, 8, base_grid=8).reshape(8, 8, 32)
    double = sincos_pos_embed_2d(32, 16, 16, base_grid=8).reshape(16, 16, 32)
    torch.testing.assert_close(double[::2, ::2], base, rtol=0, atol=1e-6)
    # The in-between tokens sit at half-integer positions: row 1, column 0 is y = 0.5, x = 0.
    omega = 1.0 / 10_000 ** (np.arange(8) / 8)
    expected_y = np.concatenate([np.sin(0.5 * omega), np.cos(0.5 * omega)])
    np.testing.assert_allclose(double[1, 0, :16].numpy(), expected_y, atol=1e-6)


def rms(x, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def test_self_attention_matches_naive_float64():
    attn = SelfAttention(dim=16, heads=2).double()
    with torch.no_grad():
        attn.norm.q.weight.uniform_(0.5, 1.5)
        attn.norm.k.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    q, k, v = (attn.qkv(x)).chunk(3, dim=-1)
    heads = []
    for h in range(2):
        sl = slice(8 * h, 8 * h + 8)
        qh, kh = rms(q[..., sl]) * attn.norm.q.weight, rms(k[..., sl]) * attn.norm.k.weight
        weights = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(8), dim=-1)
        heads.append(weights @ v[..., sl])
    expected = attn.proj(torch.cat(heads, dim=-1))
    torch.testing.assert_close(attn(x), expected, rtol=1e-10, atol=1e-10)


def test_cross_attention_mask_matches_naive_float64():
    attn = CrossAttention(dim=8, context_dim=6, heads=1).double()
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    ctx = torch.randn(1, 5, 6, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, True, False]])
    k, v = attn.kv(ctx).chunk(2, dim=-1)
    logits = rms(attn.q(x)) * attn.norm.q.weight @ (rms(k) * attn.norm.k.weight).transpose(-1, -2) / math.sqrt(8)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    expected = attn.proj(torch.softmax(logits, dim=-1) @ v)
    torch.testing.assert_close(attn(x, ctx, mask), expected, rtol=1e-10, atol=1e-10)


def test_joint_attention_is_one_softmax_over_both_streams():
    """JointAttention equals single-head attention over [context; image] with per-stream projections."""
    from models.attention import JointAttention

    attn = JointAttention(dim=8, heads=1).double()
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    ctx = torch.randn(1, 4, 8, dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True]])
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    cq, ck, cv = attn.context_qkv(ctx).chunk(3, dim=-1)
    nq, nk = rms(q) * attn.norm.q.weight, rms(k) * attn.norm.k.weight
    ncq, nck = rms(cq) * attn.context_norm.q.weight, rms(ck) * attn.context_norm.k.weight
    queries, keys, values = torch.cat([ncq, nq], 1), torch.cat([nck, nk], 1), torch.cat([cv, v], 1)
    logits = queries @ keys.transpose(-1, -2) / math.sqrt(8)
    key_mask = torch.cat([mask, torch.ones(1, 3, dtype=torch.bool)], dim=1)
    out = torch.softmax(logits.masked_fill(~key_mask[:, None, :], float("-inf")), dim=-1) @ values
    img, txt = attn(x, ctx, mask)
    torch.testing.assert_close(img, attn.proj(out[:, 4:]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(txt, attn.context_proj(out[:, :4]), rtol=1e-10, atol=1e-10)
