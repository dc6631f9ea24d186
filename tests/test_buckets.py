"""Aspect-ratio buckets (data/buckets.py) and the models on non-square grids (per-axis positions).

The bucket rule is checked against diffusers' copies of PixArt-alpha's tables (an independent source of the same
numbers); the per-axis positions against the one-scale formula they replace, bit for bit on square grids."""

import math

import pytest
import torch
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)

from data.buckets import Bucket, bucket_table, nearest_bucket, parse_buckets, pixart_table
from models import build_model, model_config
from models.embeddings import grid_positions, sincos_pos_embed_2d
from models.rope import rope_angles_2d
from tests import reference_models as reference

DIFFUSERS = {256: ASPECT_RATIO_256_BIN, 512: ASPECT_RATIO_512_BIN, 1024: ASPECT_RATIO_1024_BIN}


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_the_rule_regenerates_pixart_alphas_tables(resolution):
    table = pixart_table(resolution)
    sizes = {(b.height, b.width) for b in table}
    # diffusers ships a subset of PixArt-alpha's buckets ([h, w] keyed by round(h / w, 2)): every one is in ours.
    theirs = {(int(h), int(w)): key for key, (h, w) in DIFFUSERS[resolution].items()}
    assert set(theirs) <= sizes
    for (h, w), key in theirs.items():
        assert round(h / w, 2) == float(key)
    # The rule itself, independently: multiples of S/16, area in [0.9, 1] S^2, aspect within 4, and nothing missed.
    step, target = resolution // 16, resolution**2
    expected = {(h, w) for h in range(step, 4 * resolution + 1, step) for w in range(step, 4 * resolution + 1, step)
                if 0.9 * target <= h * w <= target and max(h, w) <= 4 * min(h, w)}
    assert sizes == expected and len(table) == 41
    assert {(w, h) for h, w in sizes} == sizes  # symmetric in height and width
    assert (resolution, resolution) in sizes and (resolution // 2, 2 * resolution) in sizes  # 1:1 and 1:4
    ratios = [b.ratio for b in table]
    assert ratios == sorted(ratios, reverse=True) and max(ratios) == 4.0 and min(ratios) == 0.25


def test_embedded_tables_by_the_rule():
    """The embedded Stages 4-5 buckets are the rule at 40 and 48 px, in steps of 8 (patch 4 x pixel space,
    doubled so no side is odd in patches) with the aspect capped at 1.5."""
    assert [b.name for b in bucket_table(40, 8, max_aspect=1.5)] == ["48x32", "40x40", "32x48"]
    assert [b.name for b in bucket_table(48, 8, max_aspect=1.5)] == ["56x40", "48x48", "40x56"]


def test_nearest_bucket_is_symmetric_in_log_ratio():
    table = pixart_table(1024)
    assert nearest_bucket(1000, 1000, table) == Bucket(1024, 1024)
    assert nearest_bucket(1080, 1920, table) == Bucket(768, 1344)  # 16:9 landscape -> 0.57
    for h, w in ((300, 1000), (1000, 300), (517, 1000), (999, 1234)):
        a, b = nearest_bucket(h, w, table), nearest_bucket(w, h, table)
        assert (a.height, a.width) == (b.width, b.height)  # the transpose of an image goes to the transposed bucket
        best = min(abs(math.log(t.ratio) - math.log(h / w)) for t in table)
        assert abs(math.log(a.ratio) - math.log(h / w)) == best


def test_parse_buckets():
    assert parse_buckets("32x48, 40x40,48x32", 40) == [Bucket(48, 32), Bucket(40, 40), Bucket(32, 48)]
    assert parse_buckets("pixart", 512) == pixart_table(512)
    for bad in ("32*48", "", "40x40,40x40", "0x4"):
        with pytest.raises(ValueError):
            parse_buckets(bad, 40)
    with pytest.raises(ValueError, match="256, 512, 1024"):
        parse_buckets("pixart", 40)


def one_scale_positions(grid_h: int, grid_w: int, base_grid: int):
    """The formula before per-axis positions: one step base_grid / sqrt(grid_h * grid_w) for both axes."""
    step = base_grid / math.sqrt(grid_h * grid_w)
    return (torch.arange(grid_h, dtype=torch.float64) * step, torch.arange(grid_w, dtype=torch.float64) * step)


def test_square_grids_keep_todays_positions_bit_for_bit():
    for side in range(1, 65):
        for base in (1, 2, 3, 7, 8, 16, 32, 64):
            ys, xs = grid_positions(side, side, base)
            old_y, old_x = one_scale_positions(side, side, base)
            assert torch.equal(ys, old_y) and torch.equal(xs, old_x), (side, base)


def test_each_axis_spans_the_base_grid():
    ys, xs = grid_positions(12, 8, base_grid=10)
    assert torch.equal(ys, torch.arange(12, dtype=torch.float64) * (10 / 12))
    assert torch.equal(xs, torch.arange(8, dtype=torch.float64) * (10 / 8))
    # sin-cos: the row half of a token's embedding depends on its row only, in base-grid units.
    table = sincos_pos_embed_2d(16, 12, 8, base_grid=10).reshape(12, 8, 16).double()
    omega = 1.0 / 10_000 ** (torch.arange(4, dtype=torch.float64) / 4)
    row, col = 5, 3
    expected = torch.cat([torch.sin(row * 10 / 12 * omega), torch.cos(row * 10 / 12 * omega),
                          torch.sin(col * 10 / 8 * omega), torch.cos(col * 10 / 8 * omega)])
    torch.testing.assert_close(table[row, col], expected, rtol=0, atol=1e-6)
    angles = rope_angles_2d(8, 12, 8, base_grid=10).reshape(12, 8, 4).double()
    omega = 10_000.0 ** (-torch.arange(2, dtype=torch.float64) / 2)
    torch.testing.assert_close(angles[row, col], torch.cat([row * 10 / 12 * omega, col * 10 / 8 * omega]),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ccDiT-debug/4", "mmDiT-debug/4", "JointDiT-debug/4", "PixelDiT-debug/4",
                                  "MMPixelDiT-debug/4"])
def test_every_family_takes_non_square_grids(name):
    """A model built for 32 x 32 runs on 24 x 40 and 40 x 24 inputs (6 x 10 and 10 x 6 patches) and computes there
    what the float64 reference does (tests/reference_models.py: each axis at its own positions, learned tables
    resized per axis, RoPE per axis). Every weight is random: adaLN-Zero's closed gates and zero head would give
    zero whatever the positions. Time scale 10 and the tolerance: tests/test_reference_models.py."""
    overrides = dict(in_channels=3, input_size=32, dim=32, heads=2, cond_dim=32, text_dim=16, text_len=4,
                     time_scale=10.0)
    if "Pixel" in name:
        overrides |= dict(pixel_dim=4)
    cfg = model_config(name, **overrides)
    model = build_model(cfg).double().eval()
    reference.randomize(model)
    g = torch.Generator().manual_seed(0)
    for h, w in ((24, 40), (40, 24)):
        x, t = torch.randn(2, 3, h, w, generator=g, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
        if cfg.conditioning == "class":
            cond = dict(labels=torch.tensor([1, cfg.num_classes]))
        else:
            cond = dict(text=torch.randn(2, 4, 16, generator=g, dtype=torch.float64),
                        text_mask=torch.tensor([[True, True, True, False], [True, False, False, False]]))
        with torch.no_grad():
            out = model(x, t, **cond)
        want = reference.forward(model.state_dict(), cfg, x, t, **cond)
        assert out.shape == (2, 3, h, w) and want.abs().max() > 1
        torch.testing.assert_close(out, want, rtol=0, atol=2e-6 * float(want.abs().max()))
