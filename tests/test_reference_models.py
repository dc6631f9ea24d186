"""Every model family against its own independent reference: tests/reference_models.py, a float64 forward written
from the papers' equations that shares no code with models/, run on the model's own weights with every parameter
randomised (gates, heads and modulation tables included, which adaLN-Zero leaves at zero and which would hide
most of the network), on square and non-square grids, with sin-cos or learned positions, with RoPE and without.
And JointDiT's block against diffusers' SD3 JointTransformerBlock.

Tolerances. The blocks run in float64 and agree with the reference to 1e-12. The whole forward cannot: the model
computes its time sinusoid, its sin-cos table, its RoPE rotation and the resize of learned positions in float32 on
purpose (models/embeddings.py, models/rope.py), so the forward, run in float64 otherwise, agrees to float32's
rounding of those tables. The time scale is 10 here, not 1000, so that float32's rounding of t x scale x
frequency (1e-4 radians at 1000) does not hide the rest: measured, the worst difference is 1.1e-7 of the output's
largest entry (2.2e-7 with ATEN_CPU_CAPABILITY=default), and FORWARD_TOLERANCE allows 2e-6.
"""

import pytest
import torch
from diffusers.models.attention import FeedForward, JointTransformerBlock

from models import ModelConfig, build_model
from tests import reference_models as ref
from tests.model_golden import SMALL

CASES = {
    "ccdit/class": dict(family="ccdit", conditioning="class"),
    "mmdit/text": dict(family="mmdit", conditioning="text"),
    "jointdit/text": dict(family="jointdit", conditioning="text"),
    "jointdit/class": dict(family="jointdit", conditioning="class"),
    "pixeldit/class": dict(family="pixeldit", conditioning="class"),
    "pixeldit/text": dict(family="pixeldit", conditioning="text"),
    "mmpixeldit/text": dict(family="mmpixeldit", conditioning="text"),
    "mmpixeldit/class": dict(family="mmpixeldit", conditioning="class"),
}
POSITIONS = {
    "sincos": dict(pos_embed="sincos", rope=False),
    "sincos+rope": dict(pos_embed="sincos", rope=True),
    "learned": dict(pos_embed="learned", rope=False),
    "learned+rope": dict(pos_embed="learned", rope=True),
}
GRIDS = ((16, 16), (16, 24), (24, 8), (8, 12))
"""The base 4x4 token grid, a wider one, a taller one (learned positions stretched one way, squeezed the other), a
smaller one."""

FORWARD_TOLERANCE = 2e-6
"""Of the reference output's largest entry (see the module docstring)."""
BLOCK_TOLERANCE = 1e-12


def config(case: str, **changes) -> ModelConfig:
    return ModelConfig(**SMALL | CASES[case] | dict(time_scale=10.0) | changes)


def float64_model(cfg: ModelConfig) -> torch.nn.Module:
    model = build_model(cfg).double().eval()
    ref.randomize(model)
    assert all(p.ne(0).all() for p in model.parameters())  # no gate, head or table left closed
    return model


def inputs(cfg: ModelConfig, h: int, w: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """float64 inputs; labels with the null class, or captions of 6, 2 and 0 valid tokens (0: only the null token
    or the registers to attend to)."""
    g = torch.Generator().manual_seed(h * 100 + w)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)[:batch]
    if cfg.conditioning == "class":
        return x, t, dict(labels=torch.tensor([0, 3, cfg.num_classes])[:batch])
    text = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g, dtype=torch.float64)
    mask = torch.arange(cfg.text_len)[None] < torch.tensor([6, 2, 0])[:batch, None]
    return x, t, dict(text=text, text_mask=mask)


def assert_matches_reference(model, cfg, x, t, cond, **model_cond) -> None:
    with torch.no_grad():
        got = model(x, t, **(model_cond or cond))
    want = ref.forward(model.state_dict(), cfg, x, t, **cond)
    assert got.dtype == torch.float64 and got.shape == want.shape
    scale = want.abs().max()
    assert scale > 1  # randomised weights: a real output, not adaLN-Zero's zero
    torch.testing.assert_close(got, want, rtol=0, atol=FORWARD_TOLERANCE * float(scale))


@pytest.mark.parametrize("positions", list(POSITIONS))
@pytest.mark.parametrize("case", list(CASES))
def test_every_family_is_its_reference_on_every_grid(case, positions):
    cfg = config(case, **POSITIONS[positions])
    model = float64_model(cfg)
    for h, w in GRIDS:
        x, t, cond = inputs(cfg, h, w)
        assert_matches_reference(model, cfg, x, t, cond)


@pytest.mark.parametrize("case", ["mmdit/text", "jointdit/text", "pixeldit/text", "mmpixeldit/text"])
def test_text_padding_and_prepared_captions_are_the_reference(case):
    """FP8's text padding (masked rows) and the sampler's captions prepared once change nothing the equations see."""
    cfg = config(case, rope=True, text_pad_multiple=16)
    model = float64_model(cfg)
    x, t, cond = inputs(cfg, 16, 24)
    assert_matches_reference(model, cfg, x, t, cond)
    if model.prepared_keys:
        assert_matches_reference(model, cfg, x, t, cond, **model.prepare_condition(**cond))


# ---- block by block, at float64's tolerance ---------------------------------------------------------------------


def block_kind(w: dict, name: str) -> str:
    """Which of the papers' blocks the module `name` is, told by its parameters' names alone."""
    for kind, marker in (("mmdit", "cross_attn.q.weight"), ("jointdit", "context_adaLN.fc1.weight"),
                         ("pixel", "compact.weight")):
        if f"{name}.{marker}" in w:
            return kind
    return "ccdit"


@pytest.mark.parametrize("case", list(CASES))
def test_every_block_is_the_reference_block_in_float64(case):
    cfg = config(case)
    model = float64_model(cfg)
    w = model.state_dict()
    names = {id(m): n for n, m in model.named_modules()}
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    b, n, d = 2, 6, cfg.dim
    x, c = rand(b, n, d), rand(b, cfg.cond_dim)
    mask = torch.tensor([[True] * 5, [True, False, True, False, False]])
    kinds = []
    for block in model.blocks:
        name = names[id(block)]
        kind = block_kind(w, name)
        kinds.append(kind)
        with torch.no_grad():
            if kind == "ccdit":
                got, want = block(x, c), ref.ccdit_block(w, name, cfg, x, c)
            elif kind == "mmdit":
                s, keys = rand(b, 6 * d), rand(b, 5, cfg.text_dim)
                got, want = block(x, s, keys, mask), ref.mmdit_block(w, name, cfg, x, s, keys, mask)
            elif kind == "jointdit":
                ctx, last = rand(b, 5, d), name.endswith(f"blocks.{cfg.depth - 1}")
                got = torch.cat(block(x, ctx, mask, c), dim=1)
                want = torch.cat(ref.jointdit_block(w, name, cfg, x, ctx, mask, c, last), dim=1)
            else:
                pixels, s = rand(b, n, cfg.patch**2, cfg.pixel_dim), rand(b, n, d)
                got, want = block(pixels, s, None), ref.pixel_block(w, name, cfg, pixels, s)
        torch.testing.assert_close(got, want, rtol=BLOCK_TOLERANCE, atol=BLOCK_TOLERANCE)
        assert want.abs().max() > 1
    assert len(kinds) == cfg.depth + (cfg.pixel_depth if cfg.is_pixel_family else 0)


# ---- JointDiT's block is SD3's ----------------------------------------------------------------------------------


def diffusers_joint_block(w: dict, name: str, cfg: ModelConfig, last: bool) -> JointTransformerBlock:
    """diffusers' JointTransformerBlock holding block `name`'s weights. The mapping: diffusers' AdaLayerNormZero is
    Linear(SiLU(temb)), the model's adaLN is fc2(SiLU(fc1(c))), so temb = fc1(c) (the caller ties the two streams'
    fc1) and diffusers' Linear is fc2; its pre-only context norm reads (scale, shift), the model's (shift, scale);
    qkv splits into to_q / to_k / to_v; the MLP is SiLU (diffusers' linear-silu) where SD3's is GELU-tanh, the one
    module swapped in."""
    d = cfg.dim
    block = JointTransformerBlock(d, cfg.heads, d // cfg.heads, context_pre_only=last, qk_norm="rms_norm")
    block.ff = FeedForward(d, dim_out=d, activation_fn="linear-silu")
    if not last:
        block.ff_context = FeedForward(d, dim_out=d, activation_fn="linear-silu")
    block = block.double()
    p = f"{name}."

    def rows(key: str, i: int) -> torch.Tensor:
        return w[p + key][i * d : (i + 1) * d]

    state = {"norm1.linear.weight": w[p + "adaLN.fc2.weight"], "norm1.linear.bias": w[p + "adaLN.fc2.bias"],
             "attn.norm_q.weight": w[p + "attn.norm.q.weight"], "attn.norm_k.weight": w[p + "attn.norm.k.weight"],
             "attn.norm_added_q.weight": w[p + "attn.context_norm.q.weight"],
             "attn.norm_added_k.weight": w[p + "attn.context_norm.k.weight"],
             "attn.to_out.0.weight": w[p + "attn.proj.weight"], "attn.to_out.0.bias": w[p + "attn.proj.bias"],
             "ff.net.0.proj.weight": w[p + "mlp.fc1.weight"], "ff.net.0.proj.bias": w[p + "mlp.fc1.bias"],
             "ff.net.2.weight": w[p + "mlp.fc2.weight"], "ff.net.2.bias": w[p + "mlp.fc2.bias"]}
    for i, (ours, theirs) in enumerate((("q", "to_q"), ("k", "to_k"), ("v", "to_v"))):
        for kind in ("weight", "bias"):
            state[f"attn.{theirs}.{kind}"] = rows(f"attn.qkv.{kind}", i)
            state[f"attn.add_{ours}_proj.{kind}"] = rows(f"attn.context_qkv.{kind}", i)
    for kind in ("weight", "bias"):
        if last:
            shift, scale = rows(f"context_adaLN.fc2.{kind}", 0), rows(f"context_adaLN.fc2.{kind}", 1)
            state[f"norm1_context.linear.{kind}"] = torch.cat([scale, shift])
        else:
            state[f"norm1_context.linear.{kind}"] = w[p + f"context_adaLN.fc2.{kind}"]
            state[f"attn.to_add_out.{kind}"] = w[p + f"attn.context_proj.{kind}"]
            state[f"ff_context.net.0.proj.{kind}"] = w[p + f"context_mlp.fc1.{kind}"]
            state[f"ff_context.net.2.{kind}"] = w[p + f"context_mlp.fc2.{kind}"]
    block.load_state_dict(state, strict=True)
    return block


@pytest.mark.parametrize("last", [False, True])
def test_jointdit_block_is_diffusers_sd3_block(last):
    cfg = config("jointdit/text")
    model = float64_model(cfg)
    index = cfg.depth - 1 if last else 0
    block = model.blocks[index]
    with torch.no_grad():  # one temb for both streams in diffusers: tie the model's two first adaLN layers
        block.context_adaLN.fc1.load_state_dict(block.adaLN.fc1.state_dict())
    theirs = diffusers_joint_block(model.state_dict(), f"blocks.{index}", cfg, last)
    g = torch.Generator().manual_seed(7)
    x, ctx = torch.randn(2, 12, cfg.dim, generator=g, dtype=torch.float64), torch.randn(
        2, 5, cfg.dim, generator=g, dtype=torch.float64)
    c = torch.randn(2, cfg.cond_dim, generator=g, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)  # SD3 attends to every context token
    with torch.no_grad():
        x_ours, ctx_ours = block(x, ctx, mask, c)
        ctx_theirs, x_theirs = theirs(x, ctx, block.adaLN.fc1(c))
    # diffusers' RMSNorm takes its mean square in float32, hence float32's tolerance.
    torch.testing.assert_close(x_ours, x_theirs, rtol=1e-6, atol=1e-6)
    if last:
        assert ctx_theirs is None and torch.equal(ctx_ours, ctx)  # the last block's context only gives keys
    else:
        torch.testing.assert_close(ctx_ours, ctx_theirs, rtol=1e-6, atol=1e-6)
    assert (x_ours - x).abs().max() > 0.1  # the gates are open: the block did something to compare
