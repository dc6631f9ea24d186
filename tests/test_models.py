"""Properties of every model family: zero init, masks, shapes, resolution change, parameter counts."""

import math

import pytest
import torch

from models import build_model, model_config
from models.__main__ import example_inputs
from models.registry import named_models
from tests.helpers import randomize_zero_inits, text_inputs

DEBUG_MODELS = ["ccDiT-debug/4", "mmDiT-debug/4", "JointDiT-debug/4", "ccDiT-debug/2", "mmDiT-debug/2"]
TEXT_MODELS = ["mmDiT-debug/4", "JointDiT-debug/4"]


def cond_inputs(cfg, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if cfg.family == "ccdit":
        return dict(labels=torch.randint(0, cfg.num_classes + 1, (batch,), generator=gen))
    text, mask = text_inputs(cfg, batch, valid=[3 + i % 5 for i in range(batch)], seed=seed)
    return dict(text=text, text_mask=mask)


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_untrained_model_outputs_exactly_zero(name):
    model = build_model(name)
    cfg = model.config
    x = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    out = model(x, torch.rand(3), **cond_inputs(cfg, 3))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_zero_init_gates_make_blocks_identity(name):
    """adaLN-Zero done properly: every gate starts closed (the reference's init pass undid this)."""
    model = build_model(name)
    for block in model.blocks:
        adaln = getattr(block, "adaLN", None)
        if adaln is not None:  # per-block adaLN
            assert torch.count_nonzero(adaln.fc2.weight) == 0 and torch.count_nonzero(adaln.fc2.bias) == 0
        else:  # adaLN-single: shared s(t) = 0 at init and zero block embeddings
            assert torch.count_nonzero(block.embedding) == 0
            assert torch.count_nonzero(block.cross_attn.proj.weight) == 0
    if hasattr(model, "t_block"):
        assert torch.count_nonzero(model.t_block.fc2.weight) == 0


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_padded_text_tokens_do_not_change_output(name):
    model = build_model(name).eval()
    randomize_zero_inits(model)
    cfg = model.config
    x, t = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(2)
    text, mask = text_inputs(cfg, 2, valid=[4, 9])
    scrambled = torch.where(mask[..., None], text, 100 * torch.randn_like(text))
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text, mask), model(x, t, scrambled, mask), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_changing_a_real_text_token_changes_output(name):
    model = build_model(name).eval()
    randomize_zero_inits(model)
    cfg = model.config
    x, t = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(2)
    text, mask = text_inputs(cfg, 2, valid=[4, 9])
    edited = text.clone()
    edited[0, 2] += 1.0  # a real token of sample 0 only
    with torch.no_grad():
        a, b = model(x, t, text, mask), model(x, t, edited, mask)
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=1e-6)  # the batch does not mix


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_dropped_caption_is_finite_and_differs_from_captioned(name):
    """An all-False mask (caption dropped for guidance) must not produce NaN from an empty softmax."""
    model = build_model(name).eval()
    randomize_zero_inits(model)
    cfg = model.config
    x, t = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size), torch.rand(2)
    text, mask = text_inputs(cfg, 2, valid=[4, 9])
    with torch.no_grad():
        uncond = model(x, t, text, torch.zeros_like(mask))
        cond = model(x, t, text, mask)
    assert torch.isfinite(uncond).all()
    assert (uncond - cond).abs().max() > 1e-3


def test_class_label_changes_output_and_null_label_is_valid():
    model = build_model("ccDiT-debug/4").eval()
    randomize_zero_inits(model)
    cfg = model.config
    x, t = torch.randn(1, 3, 32, 32).repeat(2, 1, 1, 1), torch.full((2,), 0.3)
    with torch.no_grad():
        out = model(x, t, labels=torch.tensor([1, model.null_label]))
    assert model.null_label == cfg.num_classes
    assert (out[0] - out[1]).abs().max() > 1e-3
    with pytest.raises(IndexError):
        model(x, t, labels=torch.tensor([0, cfg.num_classes + 1]))


@pytest.mark.parametrize("name", DEBUG_MODELS)
def test_other_resolutions_and_aspect_ratios_run(name):
    model = build_model(name).eval()
    randomize_zero_inits(model)
    cfg = model.config
    for h, w in [(64, 64), (16, 48)]:
        x = torch.randn(2, cfg.in_channels, h, w)
        with torch.no_grad():
            out = model(x, torch.rand(2), **cond_inputs(cfg, 2))
        assert out.shape == x.shape and torch.isfinite(out).all()


def test_non_divisible_input_is_a_clear_error():
    model = build_model("ccDiT-debug/4")
    with pytest.raises(ValueError, match="patch size 4"):
        model(torch.randn(1, 3, 30, 32), torch.rand(1), labels=torch.zeros(1, dtype=torch.long))


def test_one_training_step_from_zero_init_moves_the_output():
    """Zero init must not block learning: after a step the output is non-zero and the loss drops."""
    model = build_model("mmDiT-debug/4")
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, t = torch.randn(4, 3, 32, 32), torch.rand(4)
    cond = cond_inputs(cfg, 4)
    target = torch.randn_like(x)
    losses = []
    for _ in range(3):
        loss = (model(x, t, **cond) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert model(x, t, **cond).abs().max() > 0


# Parameter counts of the reference system (REFERENCE.md), exactly: ccDiT-XL/2 with 1000 classes + null (DiT-XL/2
# in DiT's Table 1: 675M), mmDiT-XL/2 with a 2048-wide encoder plus this repo's learned null token (text_dim wide).
@pytest.mark.parametrize(
    "name, overrides, expected",
    [
        ("ccDiT-XL/2", dict(num_classes=1000), 680_995_584),
        ("mmDiT-XL/2", dict(text_dim=2048), 664_333_120 + 2048),
    ],
)
def test_xl_parameter_counts_are_the_references(name, overrides, expected):
    with torch.device("meta"):
        model = build_model(model_config(name, **overrides))
    n = sum(p.numel() for p in model.parameters())
    assert n == expected, f"{name}: {n:,} parameters, the reference {expected:,}"


def test_a_model_config_from_keyword_fields_is_the_named_size():
    """The trainer passes model.family, size and patch as fields (no name string formatted to be parsed back): they
    pick DiT's XL (width 1152, depth 28, 16 heads [peebles2023]) whose ccDiT-XL/2 has DiT-XL/2's parameter count."""
    cfg = model_config(family="ccdit", size="XL", patch=2, num_classes=1000)
    assert (cfg.dim, cfg.depth, cfg.heads, cfg.patch, cfg.name) == (1152, 28, 16, 2, "ccDiT-XL/2")
    with torch.device("meta"):
        assert sum(p.numel() for p in build_model(cfg).parameters()) == 680_995_584
    assert model_config(family="MMDiT", size="xl", patch=4, in_channels=3) == model_config("mmDiT-XL/4", in_channels=3)
    with pytest.raises(ValueError, match="unknown model size 'XXL'"):
        model_config(family="mmdit", size="XXL", patch=2)
    with pytest.raises(TypeError, match="family, size and patch"):
        model_config(family="mmdit", size="XL")


@pytest.mark.slow
@pytest.mark.parametrize("name", named_models())
def test_every_named_model_runs_a_meta_forward(name):
    """`python -m models` must be able to describe every entry of its table: each named model builds, runs a meta
    forward at its default resolution and counts its parameters and FLOPs (54 models, about a second each)."""
    from models.__main__ import describe

    cfg = model_config(name)
    described, params, gflops, shape = describe(name)
    assert described == name == cfg.name
    assert params > 0 and gflops > 0 and shape == f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}"


def test_ccdit_xl_flops_match_the_closed_form():
    from models.__main__ import describe

    name, params, gflops, _ = describe("ccDiT-XL/2")
    assert params == 680_995_584
    # Closed form for the dominant terms: 2 FLOPs per MAC over 256 tokens in 28 blocks
    # (qkv, proj, 2 MLP matmuls = 12 d^2 per token) plus attention (2 n^2 d per block for QK and AV).
    d, n, depth = 1152, 256, 28
    expected = 2 * depth * (12 * d * d * n + 2 * n * n * d) / 1e9
    assert math.isclose(gflops, expected, rel_tol=0.02), (gflops, expected)


def test_example_inputs_match_config_shapes():
    cfg = model_config("mmDiT-debug/4")
    inputs = example_inputs(cfg, batch=2, device="cpu")
    assert inputs["text"].shape == (2, cfg.text_len, cfg.text_dim)


@pytest.mark.parametrize("name", ["ccDiT-debug/4", "mmDiT-debug/4", "JointDiT-debug/4"])
def test_guided_sampling_runs_with_a_bf16_model(name):
    """The shared sampler drives every family, with guidance, in bf16 with an fp32 ODE state."""
    from flow import sample

    model = build_model(name).eval()
    randomize_zero_inits(model)
    cfg = model.config
    cond = cond_inputs(cfg, 2)
    if cfg.family == "ccdit":
        uncond = dict(labels=torch.full((2,), model.null_label))
    else:
        uncond = dict(text=cond["text"], text_mask=torch.zeros_like(cond["text_mask"]))
    x0 = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size)
    fp32 = sample(model, x0, cond, uncond, steps=4, cfg_scale=3.0, alpha=2.0)
    bf16 = sample(model.to(torch.bfloat16), x0, cond, uncond, steps=4, cfg_scale=3.0, alpha=2.0,
                  model_dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert (fp32 - bf16).abs().max() < 0.1 * fp32.abs().max()
