"""evaluation/val_loss.py: the loss at fixed times against a closed form, independence from the ranks, the held-out
records it reads."""

import pytest
import torch

from core.conditioning import ClassConditioning
from core.ranks import Ranks
from evaluation.val_loss import ValidationLoss, bin_times, read_held_out, time_key
from flow.objective import LogitNormal
from flow.rectified_flow import RectifiedFlow


class ZeroX(torch.nn.Module):
    """An x-predicting model that always says 0: on data x1 = c its velocity error is c / (1 - t), whatever the
    noise (x_t = t c + (1 - t) x0, v_hat = -x_t / (1 - t), v = c - x0)."""

    def forward(self, x, t, labels=None):
        return torch.zeros_like(x)


def _batches(c: float, sizes=(5, 3, 4)):
    return [dict(latents=torch.full((n, 3, 4, 4), c), labels=torch.zeros(n, dtype=torch.long)) for n in sizes]


def test_fixed_times_closed_form():
    c = 0.7
    # shift=2 would move the training times; the validation times are the model's own and are not shifted.
    objective = RectifiedFlow(LogitNormal(0.0, 1.0), prediction="x", shift=2.0, base_tokens=4, patch=1)
    val = ValidationLoss(_batches(c), ClassConditioning(4, None, dropout=0.5), objective, bins=8)
    out = val(ZeroX())
    times = [0.0625, 0.1875, 0.3125, 0.4375, 0.5625, 0.6875, 0.8125, 0.9375]
    assert bin_times(8) == times
    for t in times:
        assert out[time_key(t)] == pytest.approx(c**2 / (1 - t) ** 2, rel=1e-6)
    assert out["val/loss"] == pytest.approx(sum(c**2 / (1 - t) ** 2 for t in times) / 8, rel=1e-6)


def test_same_noise_every_time_and_every_call_and_independent_of_ranks(stage1_checkpoint):
    from app.pipeline import load_pipeline

    pipe = load_pipeline(stage1_checkpoint, device="cpu")
    gen = torch.Generator().manual_seed(0)
    batches = [dict(latents=torch.rand(n, 3, 32, 32, generator=gen) * 2 - 1, labels=torch.arange(n) % 4)
               for n in (4, 4, 2)]
    objective = RectifiedFlow(LogitNormal(0.0, 1.0), prediction="x")
    alone = ValidationLoss(batches, pipe.conditioning, objective, bins=4)
    assert alone(pipe.model) == alone(pipe.model)
    split = [ValidationLoss(batches, pipe.conditioning, objective, bins=4, ranks=Ranks(r, 2)).sums(pipe.model)
             for r in (0, 1)]
    torch.testing.assert_close(split[0] + split[1], alone.sums(pipe.model), rtol=1e-12, atol=0)
    # By hand at t = 0.375 for batch 1: the documented noise, the straight path, x-prediction's velocity.
    t, x1 = 0.375, batches[1]["latents"]
    x0 = torch.randn(x1.shape, generator=alone.generator(1))
    x_t = t * x1 + (1 - t) * x0
    with torch.no_grad():
        v_hat = (pipe.model(x_t, torch.full((4,), t), labels=batches[1]["labels"]) - x_t) / (1 - t)
    want = float(((v_hat - (x1 - x0)) ** 2).mean())
    only_batch_1 = ValidationLoss([batches[1]], pipe.conditioning, objective, bins=4)
    only_batch_1.generator = lambda i: alone.generator(1)  # its batch 0 is batch 1 of the whole set
    assert only_batch_1(pipe.model)[time_key(t)] == pytest.approx(want, rel=1e-5)


def test_read_held_out_takes_the_first_records_unshuffled(embedded_data):
    folder = embedded_data / "synthetic-32" / "shards-labels"
    batches = read_held_out(folder, 10, 4)
    assert [len(b["latents"]) for b in batches] == [4, 4, 2]
    shard = torch.load(sorted(folder.glob("*.pt"))[0], weights_only=True)
    torch.testing.assert_close(torch.cat([b["latents"] for b in batches]), shard["latents"][:10])
    assert sum(len(b["latents"]) for b in read_held_out(folder, 10_000, 64)) == 160  # capped at the folder's size


def test_trainer_logs_it_on_cadence_and_in_the_summary(embedded_data, tmp_path):
    """train.eval.every=1: every step logs val/ and val_raw/ per time; the last value equals a standalone
    evaluation of the final checkpoint's weights."""
    import json

    from core import checkpoint
    from tests.stages import stage_config
    from trainer.loop import train

    held = embedded_data / "synthetic-32" / "shards-labels"
    cfg = stage_config(1, embedded_data, tmp_path, "train.max_steps=2", "train.eval.every=1",
                       f"train.eval.data={held}", "train.eval.samples=12", "train.eval.batch_size=8",
                       "train.eval.bins=3", "train.eval.weights=both")
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    val_rows = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in val_rows] == [1, 2]
    keys = {f"{p}/loss_t{t:.3f}" for p in ("val", "val_raw") for t in (1 / 6, 0.5, 5 / 6)}
    assert keys <= set(val_rows[0]) and val_rows[0]["val/seconds"] > 0
    assert summary["validation"]["step"] == 2 and summary["validation"]["val/loss"] == val_rows[1]["val/loss"]
    state = checkpoint.load(summary["checkpoint"])
    from app.pipeline import load_pipeline

    for weights, prefix in (("ema", "val"), ("raw", "val_raw")):
        pipe = load_pipeline(summary["checkpoint"], weights=weights, device="cpu")
        objective = RectifiedFlow.from_config(state["config"]["train"]["timesteps"], "x", pipe.model.config.base_grid,
                                              pipe.model.config.patch)
        alone = ValidationLoss.from_shards(held, pipe.conditioning, objective, 12, 8, bins=3, seed=cfg.seed)
        for key, value in alone(pipe.model).items():
            assert val_rows[1][key.replace("val/", f"{prefix}/")] == pytest.approx(value, rel=1e-5)


def test_trainer_validation_on_bucketed_feature_shards(embedded_data, tmp_path):
    """Stage 4's path: the held-out records come with their stored encoder states, each batch of one bucket, and
    the logged loss equals the one computed alone from the final checkpoint with the trainer's conditioning."""
    import json

    from core import checkpoint
    from core.conditioning import FeatureConditioning
    from data.shards import read_manifest
    from tests.stages import stage_config
    from trainer.loop import train

    held = embedded_data / "synthetic-40-buckets" / "shards-text"
    cfg = stage_config(4, embedded_data, tmp_path, "train.max_steps=1", "train.init_from=null", "device=cpu",
                       "train.eval.every=1", f"train.eval.data={held}", "train.eval.samples=12",
                       "train.eval.batch_size=4", "train.eval.bins=2")
    summary = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "val/loss" in r][-1]
    batches = read_held_out(held, 12, 4, text_features=True)
    assert len({tuple(b["latents"].shape[-2:]) for b in batches}) > 1  # more than one bucket among the held batches
    assert all("text_features" in b for b in batches)
    state = checkpoint.load(summary["checkpoint"])
    model = checkpoint.model_from_state(state, "ema")
    spec = read_manifest(held)[1]
    conditioning = FeatureConditioning(spec.text_features, spec.tokenizer, 0.0)
    objective = RectifiedFlow.from_config(state["config"]["train"]["timesteps"], cfg.train.prediction,
                                          model.config.base_grid, model.config.patch)
    alone = ValidationLoss.from_shards(held, conditioning, objective, 12, 4, text_features=True, bins=2,
                                       seed=cfg.seed)
    assert logged["val/loss"] == pytest.approx(alone(model)["val/loss"], rel=1e-5)


def test_trainer_refuses_held_out_data_of_another_kind(embedded_data, tmp_path):
    from tests.stages import stage_config
    from trainer.loop import ConfigError, train

    other = embedded_data / "synthetic-32" / "shards-text"
    cfg = stage_config(1, embedded_data, tmp_path, "train.max_steps=1", "train.eval.every=1",
                       f"train.eval.data={other}")
    with pytest.raises(ConfigError, match=r"train.eval.data=.*shards-text.*kind 'text' there, 'labels'"):
        train(cfg)


def test_trainer_small_fid_matches_the_pipelines_samples(embedded_data, stage1_checkpoint, tmp_path):
    """train.eval.fid_samples with the scene encoder: the logged FID equals the one of the same indices drawn
    through app/pipeline.py from the final checkpoint (same seeds, labels and sampling settings). The run starts
    from the shared Stage 1 checkpoint, whose weights are perturbed (tests/conftest.py): two steps from adaLN-Zero
    would sample gray fields whatever the seed and label, and any indices would give the same FID."""
    import json

    import numpy as np

    from app.pipeline import load_pipeline
    from evaluation.embedded import real_scenes
    from evaluation.metrics import extract, fit_gaussian, frechet_distance
    from evaluation.sample_many import class_label
    from evaluation.scene_encoder import load_scene_encoder
    from tests.stages import stage_config
    from trainer.loop import train

    real, _, _ = real_scenes(12, 32)
    np.savez(tmp_path / "ref.npz", arr_0=real)
    held = embedded_data / "synthetic-32" / "shards-labels"
    cfg = stage_config(1, embedded_data, tmp_path / "run", "train.max_steps=2", "train.eval.every=2",
                       f"train.eval.data={held}", "train.eval.samples=8", "train.eval.fid_samples=6",
                       f"train.eval.fid_reference={tmp_path / 'ref.npz'}", "train.eval.fid_features=scene",
                       "train.eval.batch_size=4", f"train.init_from={stage1_checkpoint}")
    summary = train(cfg)
    logged = summary["validation"]["fid/fid"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "fid/fid" in r] == [2]
    pipe = load_pipeline(summary["checkpoint"], device="cpu")
    labels = [class_label(cfg.seed, i, 4, "uniform") for i in range(6)]
    p = cfg.train.preview
    images = pipe.generate(labels=labels, seeds=[cfg.seed + i for i in range(6)], steps=p.steps,
                           cfg_scale=p.cfg_scale, alpha=p.alpha).numpy()
    encoder = load_scene_encoder()
    reference = fit_gaussian(extract(real, encoder)["pool"])

    def fid(drawn) -> float:
        return frechet_distance(fit_gaussian(extract(drawn, encoder)["pool"]), reference)

    assert len({image.tobytes() for image in images}) == 6  # every seed and label its own image
    assert logged == pytest.approx(fid(images), rel=1e-4)
    # The next indices' samples (other seeds and labels) score another FID: the equality above can fail.
    shifted = pipe.generate(labels=[class_label(cfg.seed, i, 4, "uniform") for i in range(1, 7)],
                            seeds=[cfg.seed + i for i in range(1, 7)], steps=p.steps, cfg_scale=p.cfg_scale,
                            alpha=p.alpha).numpy()
    assert fid(shifted) != pytest.approx(logged, rel=1e-2)
