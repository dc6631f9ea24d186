"""The pixel-space family (models/pixeldit.py), learnable positions and 2-D RoPE (models/rope.py,
models/embeddings.py), and class conditioning of the joint-attention models."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from app.sample import main as sample_main
from models import build_model, model_config
from models.embeddings import PatchEmbed, resize_positions
from models.layers import modulate_per_token
from models.pixeldit import PixelBlock
from models.rope import apply_rope, rope_angles_2d
from tests.stages import stage_config
from trainer.loop import train

ARCHS = [(family, cond) for family in ("jointdit", "pixeldit", "mmpixeldit") for cond in ("class", "text")]


def inputs(cfg, b: int, size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(b, 3, size, size, generator=g), torch.rand(b, generator=g)
    if cfg.conditioning == "class":
        return x, t, dict(labels=torch.arange(b) % (cfg.num_classes + 1))
    mask = torch.ones(b, cfg.text_len, dtype=torch.bool)
    mask[:, cfg.text_len // 2 :] = False
    return x, t, dict(text=torch.randn(b, cfg.text_len, cfg.text_dim, generator=g), text_mask=mask)


def perturb(model: torch.nn.Module, seed: int = 1) -> None:
    """Move every parameter off its initialisation, so zero-initialised paths take part."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family,conditioning", ARCHS)
def test_shapes_zero_output_at_init_and_other_resolutions(family, conditioning):
    model = build_model(f"{family}-debug/4", input_size=32, num_classes=5, conditioning=conditioning)
    x, t, cond = inputs(model.config, 3, 32)
    out = model(x, t, **cond)
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: the output head starts at exactly zero
    perturb(model)
    for size in (32, 48):  # other resolutions: learned positions resized, RoPE on the new grid
        x, t, cond = inputs(model.config, 2, size)
        out = model(x, t, **cond)
        assert out.shape == x.shape and torch.isfinite(out).all() and out.abs().mean() > 0


def test_pixel_family_defaults_and_names():
    cfg = model_config("PixelDiT-XL/16")
    assert (cfg.family, cfg.conditioning, cfg.pos_embed, cfg.rope, cfg.in_channels) == ("pixeldit", "text", "learned",
                                                                                       True, 3)
    assert model_config("MMPixelDiT-B/16").name == "MMPixelDiT-B/16" and model_config("mmpixeldit-B/16").num_registers
    with pytest.raises(ValueError, match="ccdit model takes class"):
        model_config("ccDiT-S/2", conditioning="text")
    with pytest.raises(ValueError, match="mmdit model takes text"):
        model_config("mmDiT-S/2", conditioning="class")


def test_zero_modulation_is_identity_and_scale_is_around_one():
    g = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(2, 5, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    zero = torch.zeros_like(x)
    assert torch.equal(modulate_per_token(x, zero, zero), x)
    torch.testing.assert_close(modulate_per_token(x, shift, scale), x + x * scale + shift)


def test_fresh_pixel_block_is_the_identity_and_its_modulation_is_per_pixel():
    cfg = model_config("pixeldit-debug/4", input_size=32)
    block = PixelBlock(cfg)
    block.zero_init()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 16, cfg.pixel_dim, generator=g)  # 8x8 patches of 4x4 pixels
    s = torch.randn(2, 64, cfg.dim, generator=g)
    assert torch.equal(block(x, s, None), x)
    # Open the gates through the modulation bias: pixel j's gate is its own slice of the adaLN output.
    with torch.no_grad():
        bias = block.adaLN.bias.view(16, 6, cfg.pixel_dim)
        bias[3, 5] = 1.0  # gate2 (MLP) of pixel 3 only
    out = block(x, s, None)
    changed = (out - x).abs().amax(dim=(0, 1, 3))  # per pixel position within the patch
    assert changed[3] > 0 and torch.count_nonzero(changed) == 1


def test_rope_rotation_matches_complex_multiplication():
    angles = rope_angles_2d(16, 3, 5, base_grid=3, theta=100.0)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 15, 16, generator=g, dtype=torch.float64)
    rotated = apply_rope(q.float(), angles).double()
    expected = torch.view_as_real(torch.view_as_complex(q.unflatten(-1, (-1, 2))) * torch.polar(
        torch.ones_like(angles.double()), angles.double())).flatten(-2)
    torch.testing.assert_close(rotated, expected, rtol=1e-5, atol=1e-5)
    # The first half of the pairs turns with the row, the second with the column, at theta^(-i / quarter),
    # positions stepping per axis by base_grid / side: 3 / 3 down the rows, 3 / 5 along the columns.
    row, col = 2, 3
    token = row * 5 + col
    omega = 100.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    expected = torch.cat([row * (3 / 3) * omega, col * (3 / 5) * omega])
    torch.testing.assert_close(angles[token].double(), expected, rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_the_offset():
    """q.k between rotated tokens at (y1, x1) and (y2, x2) is the same for any pair with the same offset."""
    grid, head = 8, 32
    angles = rope_angles_2d(head, grid, grid, base_grid=grid, theta=10_000.0)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head, generator=g), torch.randn(head, generator=g)
    n = grid * grid
    rq = apply_rope(q.expand(1, 1, n, head).contiguous(), angles)[0, 0]
    rk = apply_rope(k.expand(1, 1, n, head).contiguous(), angles)[0, 0]

    def score(a, b):
        return float(rq[a[0] * grid + a[1]] @ rk[b[0] * grid + b[1]])

    for offset in ((0, 0), (1, 2), (-3, 1), (4, -4)):
        scores = [score((y, x), (y + offset[0], x + offset[1])) for y, x in ((0, 4), (3, 3), (4, 4))
                  if 0 <= y + offset[0] < grid and 0 <= x + offset[1] < grid]
        assert max(scores) - min(scores) < 1e-4, (offset, scores)
    assert abs(score((0, 0), (0, 1)) - score((0, 0), (1, 0))) > 1e-3  # rows and columns are told apart


def test_apply_rope_leaves_leading_context_tokens_alone():
    angles = rope_angles_2d(8, 2, 2, base_grid=2)
    x = torch.randn(1, 2, 3 + 4, 8)
    out = apply_rope(x, angles)
    assert torch.equal(out[:, :, :3], x[:, :, :3]) and not torch.equal(out[:, :, 3:], x[:, :, 3:])
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1))  # a rotation keeps lengths


def test_rope_positions_are_in_base_grid_units():
    a = rope_angles_2d(8, 4, 4, base_grid=4)
    b = rope_angles_2d(8, 8, 8, base_grid=4)  # twice the tokens per side: half the step
    torch.testing.assert_close(b.view(8, 8, 4)[2, 2], a.view(4, 4, 4)[1, 1])


def test_learned_positions_start_from_sincos_and_resize():
    learned = PatchEmbed(3, 16, 4, base_grid=4, learned_positions=True)
    fixed = PatchEmbed(3, 16, 4, base_grid=4)
    torch.testing.assert_close(learned.position_table(4, 4, None), fixed.position_table(4, 4, None))
    assert learned.position_table(6, 6, None).shape == (36, 16)
    constant = torch.full((16, 5), 0.7)
    torch.testing.assert_close(resize_positions(constant, 4, 7, 3), torch.full((21, 5), 0.7))
    assert learned.positions.requires_grad and learned.position_table(6, 6, None).requires_grad


def test_class_conditional_joint_models_use_the_label():
    model = build_model("mmpixeldit-debug/4", input_size=32, num_classes=5, conditioning="class")
    perturb(model)
    x, t, _ = inputs(model.config, 2, 32)
    a = model(x, t, labels=torch.tensor([0, 1]))
    b = model(x, t, labels=torch.tensor([0, model.null_label]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(TypeError, match="labels"):
        model(x, t, text=torch.randn(2, 4, 384), text_mask=torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["pixeldit", "mmpixeldit"])
def test_short_x_prediction_run_on_embedded_data_lowers_the_loss(family, embedded_data, tmp_path):
    cfg = stage_config(
        2, embedded_data, tmp_path, f"model={family}", "train.init_from=null",
        "train.max_steps=40", "train.prediction=x", "train.timesteps.mean=-0.8", "train.timesteps.std=0.8",
        "optim.lr=2e-3", "+model.overrides.pixel_depth=1",
    )
    summary = train(cfg)
    assert summary["model"] == f"{'PixelDiT' if family == 'pixeldit' else 'MMPixelDiT'}-debug/4"
    assert summary["held_loss_end_raw"] < 0.8 * summary["held_loss_start"], summary
    assert math.isfinite(summary["held_loss_end_ema"])
    # The same sampler and CLI: everything comes from the checkpoint's metadata, guidance interval included.
    out = tmp_path / "samples"
    sample_main(["--model-path", summary["checkpoint"], "--prompt", "a large red circle in the top left on a gray "
                 "background", "--steps", "3", "--cfg-interval", "0.1", "0.9", "--width", "48", "--out-dir", str(out)])
    assert np.asarray(Image.open(out / "prompt_00_seed_0.png")).shape == (32, 48, 3)
