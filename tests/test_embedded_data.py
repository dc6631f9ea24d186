"""Embedded datasets: the pixels say what the captions say, held-out triples stay out, tars follow the contract.

Checks read the rendered pixels and compare them with the named colours, hand-computed regions and
textbook area ratios, not with the renderer's own geometry.
"""

import io
import json
import random
import subprocess
import sys
import tarfile
import unicodedata
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data.embedded import build, openmoji, synthetic
from data.embedded.synthetic import BACKGROUNDS, COLOURS, HELD_OUT, POSITIONS, SHAPES, SceneSpec, ShapeSpec

REPO = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = {"__key__", "png", "txt", "json"}


def _pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.float64)


def _border_colour(pixels: np.ndarray) -> np.ndarray:
    """The background as the image shows it: the median of the outermost ring (shapes never reach it)."""
    ring = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(ring, axis=0)


def _window(position: str, n: int) -> tuple[slice, slice]:
    """Where a shape at `position` must lie entirely: its quadrant, or the middle half for the centre."""
    half, quarter = n // 2, n // 4
    if position == "center":
        return slice(quarter, n - quarter), slice(quarter, n - quarter)
    rows = slice(0, half) if position.startswith("top") else slice(half, n)
    cols = slice(0, half) if position.endswith("left") else slice(half, n)
    return rows, cols


def _third_cell(position: str, n: int) -> tuple[float, float, float, float]:
    """The 3x3-grid cell of the named position, computed here independently of synthetic.region_box."""
    third = n / 3
    if position == "center":
        return (third, third, 2 * third, 2 * third)
    y0 = 0 if position.startswith("top") else 2 * third
    x0 = 0 if position.endswith("left") else 2 * third
    return (x0, y0, x0 + third, y0 + third)


def _core(mask: np.ndarray) -> np.ndarray:
    """Mask pixels whose four neighbours are in the mask too: the interior, free of anti-aliased rims."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


@pytest.mark.parametrize("image_size", [32, 64])
def test_synthetic_pixels_match_caption(image_size):
    specs = [synthetic.spec_for_index(seed=7, index=i) for i in range(50)]
    assert any(len(s.shapes) == 2 for s in specs) and any(len(s.shapes) == 1 for s in specs)
    for spec in specs:
        pixels = _pixels(synthetic.render_scene(spec, image_size))
        assert pixels.shape == (image_size, image_size, 3)
        background = _border_colour(pixels)
        assert np.abs(background - BACKGROUNDS[spec.background]).max() <= 1, synthetic.caption(spec)
        differs = np.abs(pixels - background).max(axis=-1) > 40
        claimed = np.zeros_like(differs)
        for shape in spec.shapes:
            rows, cols = _window(shape.position, image_size)
            claimed[rows, cols] = True
            mask = np.zeros_like(differs)
            mask[rows, cols] = differs[rows, cols]
            assert mask.sum() >= 0.03 * image_size**2, f"{shape} is too small to see"
            core = _core(mask)
            assert core.sum() >= 3, f"{shape} has no solid interior"
            mean = pixels[core].mean(axis=0)
            assert np.abs(mean - COLOURS[shape.colour]).max() <= 12, (synthetic.caption(spec), mean)
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5  # pixel centres
            x0, y0, x1, y1 = _third_cell(shape.position, image_size)
            assert x0 <= cx < x1 and y0 <= cy < y1, (synthetic.caption(spec), shape, cx, cy)
            bx0, by0, bx1, by1 = synthetic.region_box(shape.position, image_size)
            assert bx0 <= cx < bx1 and by0 <= cy < by1
        # Nothing is drawn outside the windows of the shapes the caption names (so two shapes never touch).
        assert not (differs & ~claimed).any(), synthetic.caption(spec)


def test_region_boxes_are_disjoint_grid_cells():
    for n in (32, 64):
        boxes = {p: synthetic.region_box(p, n) for p in POSITIONS}
        for p, box in boxes.items():
            assert np.allclose(box, _third_cell(p, n), atol=1)
        for a, b in product(POSITIONS, POSITIONS):
            if a != b:
                (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
                assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)


def _fill_fraction(shape: str, size: str, image_size: int) -> float:
    """Covered area over bounding-box area, both measured from the pixels to sub-pixel precision.

    Coverage is each pixel's blend between the background and the named colour (the renderer averages
    area); the box's width is the sum over columns of the column's largest coverage, which counts a
    partly covered edge column by how far the shape reaches into it (likewise the height over rows).
    """
    spec = SceneSpec((ShapeSpec("red", shape, "center", size),), "gray")
    pixels = _pixels(synthetic.render_scene(spec, image_size))
    bg, fg = np.array(BACKGROUNDS["gray"], float), np.array(COLOURS["red"], float)
    alpha = np.clip((pixels - bg) @ (fg - bg) / np.dot(fg - bg, fg - bg), 0, 1)
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    return float(alpha.sum() / (width * height))


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("size", ["small", "large"])
def test_shapes_are_distinguishable_by_fill(image_size, size):
    fill = {shape: _fill_fraction(shape, size, image_size) for shape in SHAPES}
    # Ideal ratios: square 1, circle pi/4, equilateral triangle 1/2, a deep five-point star about 1/3.
    # Sharp tips cover little of their pixels, so at 32 px the triangle and star measure a little high.
    assert abs(fill["square"] - 1) <= 0.04, fill
    assert abs(fill["circle"] - np.pi / 4) <= 0.03, fill
    assert 0.5 <= fill["triangle"] <= 0.63, fill
    assert fill["star"] <= 0.52 and fill["triangle"] - fill["star"] >= 0.09, fill
    assert fill["circle"] - fill["triangle"] >= 0.15, fill


def test_synthetic_captions_follow_the_grammar():
    one = SceneSpec((ShapeSpec("red", "circle", "top left", "small"),), "gray")
    two = SceneSpec(
        (ShapeSpec("red", "circle", "top left", "small"), ShapeSpec("blue", "square", "bottom right", "large")),
        "white",
    )
    assert synthetic.caption(one) == "a small red circle in the top left on a gray background"
    assert synthetic.caption(two) == (
        "a small red circle in the top left and a large blue square in the bottom right on a white background"
    )
    assert synthetic.short_caption(one) == "red circle, top left"
    assert synthetic.short_caption(two) == "red circle, top left; blue square, bottom right"
    assert two.label == SHAPES.index("circle")
    with pytest.raises(ValueError):
        SceneSpec((ShapeSpec("white", "star", "center"),), "white")  # invisible
    with pytest.raises(ValueError):
        SceneSpec((ShapeSpec("red", "star", "center"), ShapeSpec("red", "star", "top left")), "gray")  # overlap


def test_backgrounds_contrast_with_every_shape_they_carry():
    for i in range(300):
        spec = synthetic.spec_for_index(seed=3, index=i)
        for shape in spec.shapes:
            assert shape.colour != spec.background
            assert np.linalg.norm(np.subtract(COLOURS[shape.colour], BACKGROUNDS[spec.background])) >= 100


def test_held_out_triples_never_generated_but_their_parts_are():
    assert len(HELD_OUT) == 40 and len(set(HELD_OUT)) == 40
    # The documented rule, recomputed from the vocabulary orders.
    colours = list(COLOURS)
    expected = {
        (c, s, p)
        for (ci, c), (si, s), (pi, p) in product(enumerate(colours), enumerate(SHAPES), enumerate(POSITIONS))
        if (ci + 2 * si + 3 * pi) % 4 == 0
    }
    assert set(HELD_OUT) == expected
    seen = set()
    for i in range(2000):
        for shape in synthetic.spec_for_index(seed=0, index=i).shapes:
            seen.add(shape.triple)
    assert not seen & set(HELD_OUT)
    assert {c for c, _, _ in seen} == set(COLOURS)
    assert {s for _, s, _ in seen} == set(SHAPES)
    assert {p for _, _, p in seen} == set(POSITIONS)
    # Every pair of attributes inside a held-out triple is still seen together in training.
    for c, s, p in HELD_OUT:
        assert any(t[:2] == (c, s) for t in seen) and any(t[1:] == (s, p) for t in seen)
        assert any(t[0] == c and t[2] == p for t in seen)


def test_held_out_prompts_use_the_training_grammar():
    prompts = synthetic.held_out_prompts()
    assert len(prompts) == len(HELD_OUT)
    for (c, s, p), prompt in zip(HELD_OUT, prompts, strict=True):
        assert prompt == f"a large {c} {s} in the {p} on a gray background"
    assert synthetic.held_out_prompts(background="gray", size="small")[0].startswith("a small ")
    with pytest.raises(ValueError):
        synthetic.held_out_prompts(background="white")  # a white shape among them would be invisible


def test_sample_spec_accepts_python_and_numpy_generators():
    for make in (random.Random, np.random.default_rng):
        a = [synthetic.sample_spec(make(5)) for _ in range(3)]
        b = [synthetic.sample_spec(make(5)) for _ in range(3)]
        assert a == b
    python_rng, numpy_rng = random.Random(1), np.random.default_rng(1)
    assert len({synthetic.sample_spec(python_rng) for _ in range(50)}) > 30
    assert len({synthetic.sample_spec(numpy_rng) for _ in range(50)}) > 30


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def test_synthetic_build_is_deterministic_from_the_seed(tmp_path):
    kwargs = dict(image_size=32, num_samples=24, samples_per_tar=10, progress=False)
    build.build("synthetic", tmp_path / "a", seed=0, **kwargs)
    build.build("synthetic", tmp_path / "b", seed=0, **kwargs)
    build.build("synthetic", tmp_path / "c", seed=1, **kwargs)
    a, b, c = (_tar_bytes(tmp_path / d) for d in "abc")
    assert list(a) == ["synthetic-0000.tar", "synthetic-0001.tar", "synthetic-0002.tar"]
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)


def _read_samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def _check_contract(out: Path, name: str, image_size: int) -> tuple[dict, list[dict]]:
    manifest = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    tars = sorted(out.glob(f"{name}-*.tar"))
    assert [t.name for t in tars] == [f"{name}-{i:04d}.tar" for i in range(manifest["num_tars"])]
    assert not list(out.glob("*.tmp"))
    samples = _read_samples([str(t) for t in tars])
    assert len(samples) == manifest["num_samples"]
    assert len({s["__key__"] for s in samples}) == len(samples)
    for s in samples:
        assert CONTRACT_KEYS <= set(s) and set(s) - CONTRACT_KEYS <= {"__url__", "__local_path__"}
        image = Image.open(io.BytesIO(s["png"]))
        assert image.format == "PNG" and image.mode == "RGB" and image.size == (image_size, image_size)
        record = json.loads(s["json"])
        assert record["caption"] == s["txt"].decode("utf-8")
        assert record["short_caption"]
        assert manifest["class_names"][record["label"]] == record["label_name"]
    for field in ("name", "licence", "source", "image_size", "num_samples", "class_names", "num_tars"):
        assert field in manifest
    assert manifest["name"] == name and manifest["image_size"] == image_size
    return manifest, samples


@pytest.mark.slow
def test_build_cli_writes_the_tar_contract(tmp_path):
    out = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "data.embedded.build", "--dataset", "synthetic", "--out", str(out)]
    cmd += ["--num-samples", "23", "--samples-per-tar", "10", "--image-size", "32", "--seed", "4"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    manifest, samples = _check_contract(out, "synthetic", 32)
    assert manifest["num_samples"] == 23 and manifest["num_tars"] == 3
    assert manifest["class_names"] == list(SHAPES)
    assert [tuple(t) for t in manifest["held_out"]] == list(HELD_OUT)
    with tarfile.open(out / "synthetic-0000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["synthetic-000000.json", "synthetic-000000.png", "synthetic-000000.txt"]
    record = json.loads(samples[0]["json"])
    assert record["shapes"][0]["shape"] == record["label_name"]
    assert record["caption"] == synthetic.caption(synthetic.spec_for_index(4, 0))


def test_rebuild_removes_stale_tars_and_a_failed_build_leaves_nothing_finished(tmp_path, monkeypatch):
    build.build("synthetic", tmp_path, num_samples=20, samples_per_tar=4, progress=False)
    assert len(list(tmp_path.glob("*.tar"))) == 5
    build.build("synthetic", tmp_path, num_samples=20, samples_per_tar=10, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["synthetic-0000.tar", "synthetic-0001.tar"]

    calls = []
    real_encode = build.encode

    def failing_encode(sample):
        calls.append(sample.key)
        if len(calls) == 15:
            raise RuntimeError("disk full")
        return real_encode(sample)

    monkeypatch.setattr(build, "encode", failing_encode)
    for stale in tmp_path.glob("*.tar"):
        stale.unlink()
    with pytest.raises(RuntimeError):
        build.build("synthetic", tmp_path, num_samples=20, samples_per_tar=10, progress=False)
    assert [p.name for p in tmp_path.glob("*.tar")] == ["synthetic-0000.tar"]  # the half-written one is not
    assert not (tmp_path / "dataset.json").exists()


def _colourfulness(pixels: np.ndarray) -> np.ndarray:
    return pixels.max(axis=-1) - pixels.min(axis=-1)


@pytest.mark.parametrize("image_size", [32, 64])
def test_openmoji_renders_centred_colour_emoji(image_size):
    image = openmoji.render_emoji("\U0001f600", image_size)  # grinning face: a yellow disc
    assert image is not None and image.mode == "RGB" and image.size == (image_size, image_size)
    pixels = _pixels(image)
    assert np.all(pixels[0] == 255) and np.all(pixels[:, -1] == 255)  # white margin
    drawn = np.abs(pixels - 255).max(axis=-1) > 24
    ys, xs = np.nonzero(drawn)
    extent = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) / image_size
    assert 0.78 <= extent <= 0.92
    assert abs((xs.min() + xs.max() + 1) / 2 - image_size / 2) <= 1.5
    assert abs((ys.min() + ys.max() + 1) / 2 - image_size / 2) <= 1.5
    yellow = (pixels[..., 0] > 200) & (pixels[..., 1] > 150) & (pixels[..., 2] < 120)
    assert yellow.mean() > 0.2  # in colour, not grayscale


@pytest.mark.slow
def test_openmoji_sample_of_emoji_renders_in_colour_across_groups():
    emoji = openmoji.list_emoji()
    assert len(emoji) > 3000
    assert emoji == sorted(emoji, key=lambda e: e.hexcode + ".svg")  # filename order
    picked = emoji[:: len(emoji) // 300][:300]
    assert len({e.group for e in picked}) >= 8
    coloured = 0
    for e in picked[::5]:
        for size in (32, 64):
            image = openmoji.render_emoji(e.text, size)
            assert image is not None, e
            assert image.size == (size, size)
        coloured += _colourfulness(_pixels(image)).max() > 60
    assert coloured >= 0.9 * len(picked[::5])


def test_openmoji_groups_follow_unicode():
    expected = {
        "\U0001f600": "Smileys & Emotion",
        "\u2764": "Smileys & Emotion",
        "\U0001f44d": "People & Body",
        "\U0001f44d\U0001f3fd": "People & Body",
        "\U0001f436": "Animals & Nature",
        "\U0001f337": "Animals & Nature",
        "\U0001f355": "Food & Drink",
        "\U0001f980": "Food & Drink",
        "\U0001f697": "Travel & Places",
        "\U0001f319": "Travel & Places",
        "\u26bd": "Activities",
        "\U0001f3c6": "Activities",
        "\U0001f4a1": "Objects",
        "\U0001f451": "Objects",
        "\u267b": "Symbols",
        "#\ufe0f\u20e3": "Symbols",
        "\U0001f1e9\U0001f1ea": "Flags",
        "\U0001f3c1": "Flags",
    }
    for text, group in expected.items():
        assert openmoji.GROUPS[openmoji.emoji_group([ord(c) for c in text])] == group, (text, group)


def test_openmoji_captions_are_lowercase_unicode_names():
    by_hex = {e.hexcode: e for e in openmoji.list_emoji()}
    singles = [e for e in by_hex.values() if "-" not in e.hexcode and not 0x1F3FB <= int(e.hexcode, 16) <= 0x1F3FF]
    assert len(singles) > 1000
    for e in singles:
        assert e.name == unicodedata.name(chr(int(e.hexcode, 16))).lower().removeprefix("emoji component ")
    assert all(e.name == e.name.lower() for e in by_hex.values())
    assert by_hex["1F600"].name == "grinning face"
    assert by_hex["1F1E9-1F1EA"].name == "flag of germany"
    assert by_hex["1F3F4-E0067-E0062-E0073-E0063-E0074-E007F"].name == "flag of scotland"
    assert by_hex["0031-FE0F-20E3"].name == "keycap digit one"
    assert by_hex["1F44D-1F3FD"].name == "thumbs up sign (medium skin tone)"
    assert by_hex["1F468-200D-1F469-200D-1F467"].name == "family of man, woman and girl"
    assert by_hex["1F647-200D-2640-FE0F"].name == "woman bowing deeply"
    assert not any(h.startswith("E") for h in by_hex)  # private-use extras have no Unicode name


def test_openmoji_rejects_what_is_not_one_glyph():
    assert openmoji.render_emoji("\U0001f600\U0001f600", 32) is None  # two glyphs side by side
    assert openmoji.render_emoji("\U0001f436\u200d\U0001f355", 32) is None  # no such ZWJ ligature
    assert openmoji.render_emoji(chr(0x10FFFD), 32) is None  # not in the font


@pytest.mark.slow
def test_openmoji_build_records_licence_and_contract(tmp_path):
    manifest = build.build("openmoji", tmp_path, image_size=32, num_samples=25, samples_per_tar=10, progress=False)
    assert manifest["licence"] == "CC BY-SA 4.0"
    assert "OpenMoji" in manifest["attribution"] and manifest["source"].startswith("https://")
    assert len(manifest["class_names"]) >= 8
    manifest, samples = _check_contract(tmp_path, "openmoji", 32)
    assert manifest["num_samples"] == 25 and manifest["num_tars"] == 3
    record = json.loads(samples[0]["json"])
    assert record["caption"] == f"an emoji of a {record['short_caption']} on a white background"
    assert samples[0]["__key__"] == f"openmoji-{record['hexcode']}"


# ---- non-square scenes (the aspect-ratio buckets of the embedded Stages 4-5) ---------------------------------


def _axis_window(position: str, height: int, width: int) -> tuple[slice, slice]:
    """`_window` per axis: the quadrant (or the middle half) of a height x width image."""
    rows, _ = _window(position, height)
    _, cols = _window(position, width)
    return rows, cols


@pytest.mark.parametrize("height, width", [(32, 48), (48, 32), (40, 56), (56, 40)])
def test_non_square_pixels_match_caption(height, width):
    """Each shape inside its quadrant (per axis), its centroid in its third-of-each-axis cell, its colour as named,
    and round: a circle's extent is the same across as down (the diameter is a fraction of the shorter side)."""
    specs = [synthetic.spec_for_index(seed=7, index=i) for i in range(40)]
    for spec in specs:
        pixels = _pixels(synthetic.render_scene(spec, (height, width)))
        assert pixels.shape == (height, width, 3)
        background = _border_colour(pixels)
        differs = np.abs(pixels - background).max(axis=-1) > 40
        claimed = np.zeros_like(differs)
        for shape in spec.shapes:
            rows, cols = _axis_window(shape.position, height, width)
            claimed[rows, cols] = True
            mask = np.zeros_like(differs)
            mask[rows, cols] = differs[rows, cols]
            core = _core(mask)
            assert core.sum() >= 3 and np.abs(pixels[core].mean(axis=0) - COLOURS[shape.colour]).max() <= 12
            ys, xs = np.nonzero(mask)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            x0, _, x1, _ = _third_cell(shape.position, width)
            _, y0, _, y1 = _third_cell(shape.position, height)
            assert x0 <= cx < x1 and y0 <= cy < y1, (synthetic.caption(spec), shape, cx, cy)
            bx0, by0, bx1, by1 = synthetic.region_box(shape.position, (height, width))
            assert bx0 <= cx < bx1 and by0 <= cy < by1
            if shape.shape in ("circle", "square"):
                assert abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 1, (shape, height, width)
                bg, fg = np.array(BACKGROUNDS[spec.background], float), np.array(COLOURS[shape.colour], float)
                alpha = np.clip((pixels[rows, cols] - bg) @ (fg - bg) / np.dot(fg - bg, fg - bg), 0, 1)
                expected = _area(shape, min(height, width))
                assert abs(alpha.sum() - expected) <= 0.05 * expected, (shape, alpha.sum(), expected)
        assert not (differs & ~claimed).any(), synthetic.caption(spec)


def _area(shape, side: int) -> float:
    """Pixels a circle or square of this spec covers at an image whose shorter side is `side` (textbook areas)."""
    d = synthetic.SIZES[shape.size] * side
    return np.pi * d * d / 4 if shape.shape == "circle" else (0.88 * d) ** 2


@pytest.mark.slow
def test_build_with_sizes_renders_them_in_turn(tmp_path):
    out = tmp_path / "synthetic"
    cmd = [sys.executable, "-m", "data.embedded.build", "--dataset", "synthetic", "--out", str(out), "--num-samples",
           "7", "--image-size", "40", "--sizes", "40x40,32x48,48x32"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    manifest = json.loads((out / "dataset.json").read_text())
    assert manifest["sizes"] == [[40, 40], [32, 48], [48, 32]] and manifest["image_size"] == 40
    samples = _read_samples([str(p) for p in sorted(out.glob("synthetic-*.tar"))])
    sizes = [Image.open(io.BytesIO(s["png"])).size for s in samples]  # PIL: (width, height)
    assert sizes == [(40, 40), (48, 32), (32, 48)] * 2 + [(40, 40)]
    for i, s in enumerate(samples):  # the scene of an index does not depend on the size it is drawn at
        assert json.loads(s["json"])["caption"] == synthetic.caption(synthetic.spec_for_index(0, i))
    bad = subprocess.run([*cmd[:-1], "40*40"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "--sizes" in bad.stderr
