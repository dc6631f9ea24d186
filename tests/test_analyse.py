"""The scene analyser reads back what the renderer drew.

Ground truth is the renderer's spec, never another run of the analyser: every held-out triple and a sample of
training scenes, at 32 and 64 px, clean and degraded (a 0.6 px Gaussian blur, then sigma = 10 pixel noise, the
noise last so that the blur does not smooth it away).
"""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from data.embedded.synthetic import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SceneSpec,
    ShapeSpec,
    held_out_specs,
    render_scene,
    spec_for_index,
)
from evaluation.analyse import analyse_scene

IMAGE_SIZES = (32, 40, 48, 64)
NOISE_SIGMA = 10.0
BLUR_RADIUS = 0.6
NUM_TRAINING_SPECS = 32


def degrade(image: Image.Image, seed: int) -> np.ndarray:
    """Blur, then add Gaussian noise per pixel and channel, rounded and clipped back to uint8."""
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(BLUR_RADIUS)), dtype=np.float64)
    noisy = blurred + np.random.default_rng(seed).normal(0.0, NOISE_SIGMA, blurred.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def training_specs() -> list[SceneSpec]:
    """The first single-shape scenes of the seed-0 training set: both sizes and every background."""
    specs = (spec_for_index(0, i) for i in range(10 * NUM_TRAINING_SPECS))
    return [s for s in specs if len(s.shapes) == 1][:NUM_TRAINING_SPECS]


def misreadings(specs: list[SceneSpec], size: int, degraded: bool, named: bool = True) -> list[str]:
    """One line per scene whose reading differs from its spec (or lies outside the named region).

    `named`: pass the spec's background to the analyser, as the evaluation does; else the analyser estimates it.
    """
    failures = []
    for index, spec in enumerate(specs):
        image = render_scene(spec, size)
        pixels = degrade(image, seed=1000 * size + index) if degraded else np.asarray(image)
        reading = analyse_scene(pixels, background=spec.background if named else None)
        truth = spec.shapes[0]
        if reading is None:
            failures.append(f"{truth} on {spec.background}: nothing found")
        elif (reading.colour, reading.shape, reading.position) != truth.triple or not reading.in_region:
            failures.append(f"{truth} on {spec.background}: read {reading}")
    return failures


CONDITIONS = pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
SIZES = pytest.mark.parametrize("size", IMAGE_SIZES)


@SIZES
@CONDITIONS
def test_reads_every_held_out_scene(size, degraded):
    assert misreadings(held_out_specs(), size, degraded) == []


@SIZES
@CONDITIONS
@pytest.mark.parametrize("named", [True, False], ids=["named-background", "estimated-background"])
def test_reads_training_scenes(size, degraded, named):
    assert misreadings(training_specs(), size, degraded, named) == []


def test_training_sample_covers_the_vocabulary():
    """Otherwise `test_reads_training_scenes` could pass while never seeing some attribute value."""
    specs = training_specs()
    assert len(specs) == NUM_TRAINING_SPECS
    assert {s.shapes[0].colour for s in specs} == set(COLOURS)
    assert {s.shapes[0].shape for s in specs} == set(SHAPES)
    assert {s.shapes[0].position for s in specs} == set(POSITIONS)
    assert {s.shapes[0].size for s in specs} == {"small", "large"}
    assert len({s.background for s in specs}) >= 4


@SIZES
@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_blank_background_reads_as_nothing(size, background):
    blank = Image.new("RGB", (size, size), BACKGROUNDS[background])
    for pixels in (np.asarray(blank), degrade(blank, seed=size)):
        assert analyse_scene(pixels, background=background) is None
        assert analyse_scene(pixels) is None


@pytest.mark.slow
@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
def test_a_wrong_colour_reads_as_that_colour(degraded):
    """Each held-out shape drawn in every other colour: the analyser names the colour drawn, not the prompt's."""
    failures = []
    for spec in held_out_specs():
        truth = spec.shapes[0]
        others = [c for c in COLOURS if c != truth.colour]
        recoloured = [SceneSpec((ShapeSpec(c, truth.shape, truth.position, truth.size),), "gray") for c in others]
        failures += misreadings(recoloured, 32, degraded)
    assert failures == []
