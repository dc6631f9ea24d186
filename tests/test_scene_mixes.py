"""Scene mixes of the synthetic data (data/embedded/synthetic.py: MIXES): what each stage of the embedded curriculum
trains on. Checked on the rendered pixels with hand-computed geometry, and on the draws' distribution."""

import json
from collections import Counter

import numpy as np
import pytest

from data.embedded import build, synthetic
from data.embedded.synthetic import HELD_OUT, MIXES, POSITIONS, SHAPES, parse_mix, render_scene, spec_for_index


def _specs(mix: str, n: int, seed: int = 0) -> list[synthetic.SceneSpec]:
    return [spec_for_index(seed, i, parse_mix(mix)) for i in range(n)]


@pytest.mark.parametrize("mix", list(MIXES))
def test_no_mix_draws_a_held_out_triple(mix):
    for spec in _specs(mix, 3000):
        assert not {s.triple for s in spec.shapes} & set(HELD_OUT)


def test_objects_are_one_huge_centred_shape_whose_label_is_the_pixels():
    """The label is true to the pixels: a disc of diameter 0.62 * 32 px covers pi * 9.92^2 = 309 px (30% of the
    image), centred; the class of the image is the shape drawn."""
    specs = _specs("objects", 200)
    assert {len(s.shapes) for s in specs} == {1}
    assert {(s.shapes[0].size, s.shapes[0].position) for s in specs} == {("huge", "center")}
    assert {SHAPES[s.label] for s in specs} == set(SHAPES)  # every class drawn
    circle = next(s for s in specs if s.shapes[0].shape == "circle")
    pixels = np.asarray(render_scene(circle, 32), dtype=np.float64)
    background = np.array(synthetic.BACKGROUNDS[circle.background], dtype=float)
    colour = np.array(synthetic.COLOURS[circle.shapes[0].colour], dtype=float)
    coverage = ((pixels - background) @ (colour - background) / ((colour - background) ** 2).sum()).clip(0, 1)
    assert coverage.sum() == pytest.approx(np.pi * (0.31 * 32) ** 2, rel=0.02)
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    assert (coverage * xs).sum() / coverage.sum() == pytest.approx(16, abs=0.05)
    assert (coverage * ys).sum() / coverage.sum() == pytest.approx(16, abs=0.05)


def test_jitter_moves_the_centroid_within_its_bound():
    specs = _specs("objects,jitter=0.05", 300)
    offsets = np.array([s.shapes[0].offset for s in specs])
    assert np.abs(offsets).max() <= 0.05
    assert np.abs(offsets).max() > 0.04 and abs(offsets.mean()) < 0.01  # spread over the range, about zero
    spec = max(specs, key=lambda s: abs(s.shapes[0].offset[0]))
    if spec.shapes[0].shape != "circle":
        spec = synthetic.SceneSpec((synthetic.ShapeSpec(spec.shapes[0].colour, "circle", "center", "huge",
                                                        spec.shapes[0].offset),), spec.background)
    pixels = np.asarray(render_scene(spec, 64), dtype=np.float64)
    background = np.array(synthetic.BACKGROUNDS[spec.background], dtype=float)
    colour = np.array(synthetic.COLOURS[spec.shapes[0].colour], dtype=float)
    coverage = ((pixels - background) @ (colour - background) / ((colour - background) ** 2).sum()).clip(0, 1)
    xs = np.mgrid[0:64, 0:64][1] + 0.5
    assert (coverage * xs).sum() / coverage.sum() == pytest.approx(32 + 64 * spec.shapes[0].offset[0], abs=0.1)


def test_single_draws_one_large_shape_at_every_position_and_background():
    specs = _specs("single", 2000)
    assert {len(s.shapes) for s in specs} == {1} and {s.shapes[0].size for s in specs} == {"large"}
    positions = Counter(s.shapes[0].position for s in specs)
    assert set(positions) == set(POSITIONS) and min(positions.values()) > 300  # about 400 each
    assert {s.background for s in specs} == set(synthetic.BACKGROUNDS)
    gray = _specs("single,backgrounds=gray", 200)
    assert {s.background for s in gray} == {"gray"}


def test_captions_is_single_on_gray_scene_for_scene():
    """The caption stages' mix draws exactly the scenes the ablation measured as `single,backgrounds=gray` (README,
    "What limits it"): every scene one large shape on gray, and the same scene at every index."""
    specs = _specs("captions", 2000)
    assert {s.background for s in specs} == {"gray"} and {s.shapes[0].size for s in specs} == {"large"}
    assert {len(s.shapes) for s in specs} == {1} and {s.shapes[0].position for s in specs} == set(POSITIONS)
    assert specs == _specs("single,backgrounds=gray", 2000)


def test_the_default_mix_keeps_two_shape_scenes_and_both_sizes():
    specs = _specs("scenes", 2000)
    share = sum(len(s.shapes) == 2 for s in specs) / len(specs)
    assert share == pytest.approx(synthetic.TWO_SHAPE_PROBABILITY, abs=0.04)
    assert {sh.size for s in specs for sh in s.shapes} == {"small", "large"}


@pytest.mark.parametrize("text, message", [
    ("blobs", "unknown mix"),
    ("objects,colour=red", "key=value"),
    ("single,sizes=huge", "corner"),  # huge only at the centre (ShapeSpec refuses it elsewhere when drawn)
    ("scenes,sizes=huge", "two-shape"),
    ("single,backgrounds=pink", "not among"),
])
def test_bad_mixes_are_refused_by_name(text, message):
    with pytest.raises(ValueError, match=message):
        _specs(text, 50)


def test_build_records_the_mix(tmp_path):
    build.build("synthetic", tmp_path, image_size=16, num_samples=4, mix="objects", progress=False)
    recorded = json.loads((tmp_path / build.MANIFEST).read_text())["mix"]
    assert recorded["sizes"] == ["huge"] and recorded["positions"] == ["center"]
    with pytest.raises(ValueError, match="synthetic scenes only"):
        build.build("openmoji", tmp_path / "o", num_samples=1, mix="objects", progress=False)
