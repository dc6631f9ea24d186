"""The embedded default's metrics: the committed scene encoder reads the scenes, its Frechet distance orders
degradations, and evaluation.embedded.report works on the tests' Stage 1 and Stage 2 checkpoints."""

import math

import numpy as np
import pytest
import torch

from evaluation.embedded import real_scenes, report
from evaluation.metrics import extract, fit_gaussian, frechet_distance
from evaluation.scene_encoder import HEADS, WEIGHTS, encoder_info, load_scene_encoder


@pytest.fixture(scope="module")
def encoder():
    return load_scene_encoder()


def test_committed_weights_are_small_and_read_fresh_scenes(encoder):
    """Scenes of a seed the encoder never saw (4), at the three embedded sizes: every head far above chance."""
    from scripts.tools.train_scene_encoder import render

    assert WEIGHTS.stat().st_size < 3 * 2**20
    images, targets = render(4, 300)
    right = {k: 0 for k in HEADS}
    for size in (32, 40, 48):
        rows = [i for i, im in enumerate(images) if im.shape[-1] == size]
        with torch.no_grad():
            logits = encoder.logits(torch.stack([images[i] for i in rows]))
        for k in HEADS:
            right[k] += int((logits[k].argmax(1) == targets[k][rows]).sum())
    accuracy = {k: v / len(images) for k, v in right.items()}
    chance = {"shape": 0.25, "colour": 0.125, "position": 0.2, "background": 0.2, "shapes": 0.6}
    assert all(accuracy[k] > min(0.9, chance[k] + 0.5) for k in HEADS), accuracy
    assert set(encoder_info()["test_accuracy"]) == set(HEADS)


def test_frechet_distance_on_its_features_orders_degradations(encoder):
    real, _, _ = real_scenes(200, 32)
    other, _, _ = real_scenes(200, 32, start=200)
    rng = np.random.default_rng(0)
    noisy = np.clip(real + rng.normal(0, 40, real.shape), 0, 255).astype(np.uint8)
    gray = np.full_like(real, 128)
    gray = np.clip(gray + rng.normal(0, 5, real.shape), 0, 255).astype(np.uint8)
    stats = fit_gaussian(extract(real, encoder)["pool"])
    fd = {name: frechet_distance(fit_gaussian(extract(x, encoder)["pool"]), stats)
          for name, x in (("other", other), ("noisy", noisy), ("gray", gray))}
    assert fd["other"] < fd["noisy"] < fd["gray"], fd


@pytest.mark.parametrize("fixture", ["stage1_checkpoint", "stage2_checkpoint"])
def test_report_on_the_fixture_checkpoints(fixture, request):
    out = report(request.getfixturevalue(fixture), num_samples=12, batch_size=6, steps=2, bins=4)
    assert out["conditioning"] == ("class" if fixture == "stage1_checkpoint" else "text")
    assert out["feature_net"] == "evaluation/scene_encoder.safetensors" and out["scene_encoder_accuracy"]
    assert math.isfinite(out["frechet_distance"]) and out["frechet_distance"] > out["frechet_distance_real"] > 0
    assert list(out["validation_loss_by_time"]) == ["0.125", "0.375", "0.625", "0.875"]
    assert out["validation_loss"] == pytest.approx(np.mean(list(out["validation_loss_by_time"].values())))
