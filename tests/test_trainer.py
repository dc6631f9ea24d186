"""The training loop and its parts: EMA against its closed form, the LR schedule, atomic checkpoints,
Hydra composition of every stage, and a short Stage-1 run that resumes."""

import json
import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from core import checkpoint
from tests.stages import stage_config
from trainer.ema import EMA
from trainer.loop import train
from trainer.optim import lr_factor, param_groups

CONFIGS = str(Path(__file__).resolve().parents[1] / "configs")


def test_ema_matches_closed_form():
    """With a parameter that jumps to a constant c, EMA after k updates is c (1 - d^k) from 0."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, every=1)
    with torch.no_grad():
        model.weight.fill_(2.0)
    for step in range(1, 6):
        ema.update(model, step)
    assert ema.model.weight.item() == pytest.approx(2.0 * (1 - 0.9**5), rel=1e-6)


def test_ema_reference_schedule_updates_every_k_with_a_ramp():
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.99, every=100, warmup_steps=3000, start_decay=0.01)
    assert ema.decay_at(0) == pytest.approx(0.01)
    assert ema.decay_at(1500) == pytest.approx(0.5)
    assert ema.decay_at(10_000) == pytest.approx(0.99)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 99)  # not a multiple of 100: no update
    assert ema.model.weight.item() == 0.0
    ema.update(model, 100)  # decay at step 100 = 0.01 + 0.98 / 30
    assert ema.model.weight.item() == pytest.approx(1 - (0.01 + 0.98 * 100 / 3000), rel=1e-6)


def test_lr_schedule_warmup_constant_decay():
    factors = [lr_factor(s, warmup_steps=10, max_steps=100, decay_fraction=0.2) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[50] == 1.0 and factors[80] == pytest.approx(1.0) and factors[90] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(0.05)


def test_no_weight_decay_on_biases_norms_embeddings():
    from models import build_model

    model = build_model("mmDiT-debug/4")
    decay, no_decay = param_groups(model, 0.03)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "blocks.0.attn.qkv.weight" in decayed
    assert not any(n.endswith("bias") or "norm" in n or "embedding" in n or "null_text" in n for n in decayed)
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0


def test_atomic_save_leaves_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "step_00000001.pt"
    checkpoint.save_atomic({"a": torch.ones(2)}, path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))


def test_corrupt_checkpoint_error_names_the_file(tmp_path):
    bad = tmp_path / "step_00000002.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="step_00000002.pt"):
        checkpoint.load(bad)


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_every_stage_config_composes(stage):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name=f"stage{stage}", overrides=["experiment=embedded"])
    assert cfg.stage == stage and cfg.train.max_steps > 0
    assert cfg.model.family == ("ccdit" if stage == 1 else "mmdit") and cfg.vae.kind == "identity"
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        real = compose(config_name=f"stage{stage}")
    assert real.stage == stage and real.vae.kind == "sd3" and real.text_encoder.hidden_size == 2048


def test_groups_override():
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose(config_name="stage2", overrides=["data=aesthetic_256", "model=jointdit", "train.batch_size=64"])
    assert cfg.model.family == "jointdit" and cfg.train.batch_size == 64 and cfg.train.grad_accum == 20


def test_unknown_config_key_is_an_error():
    from hydra.errors import ConfigCompositionException

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        with pytest.raises(ConfigCompositionException):
            compose(config_name="stage1", overrides=["train.no_such_key=1"])


def test_stage1_embedded_run_writes_outputs_and_resumes(embedded_data, tmp_path):
    full = train(stage_config(1, embedded_data, tmp_path / "full", "train.max_steps=4", "train.ckpt_every=2"))
    assert Path(full["checkpoint"]).exists() and Path(full["loss_plot"]).exists()
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["held_loss_start"] > 0 and summary["held_loss_end_ema"] > 0
    a = checkpoint.load(Path(full["checkpoint"]))
    meta = a["metadata"]
    assert meta["model"]["family"] == "ccdit" and a["step"] == 4 and meta["conditioning"] == "class"
    assert meta["class_names"] == ["circle", "square", "triangle", "star"] and meta["vae"]["id"] == "identity"
    assert sorted(p.name for p in (tmp_path / "full" / "samples").iterdir()) == [
        "step_00000004_ema.png", "step_00000004_raw.png"]

    # Lose the step-4 checkpoint as if the run had died after step 2; a rerun continues from step 2.
    ckpts = checkpoint.list_checkpoints(tmp_path / "full" / "checkpoints")
    assert [c.name for c in ckpts] == ["step_00000002.pt", "step_00000004.pt"]
    ckpts[-1].unlink()
    resumed = train(stage_config(1, embedded_data, tmp_path / "full", "train.max_steps=4", "train.ckpt_every=2"))
    b = checkpoint.load(Path(resumed["checkpoint"]))
    assert a["history"] == b["history"]  # bit for bit: same data, noise, times and dropout from step 3 on
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_data_that_does_not_fit_the_stage_is_a_clear_error(embedded_data, tmp_path):
    labels = str(embedded_data / "synthetic-32" / "shards-labels")
    with pytest.raises(ValueError, match=r"model.family=mmdit \(conditioning=text\) needs captions"):
        train(stage_config(2, embedded_data, tmp_path, f"data.path={labels}", "train.init_from=null"))
    with pytest.raises(ValueError, match=r"model.family=pixeldit \(conditioning=class\) needs class labels"):
        train(stage_config(2, embedded_data, tmp_path, "model=pixeldit", "model.conditioning=class",
                           "train.init_from=null"))
    with pytest.raises(ValueError, match="vae=sd3"):
        train(stage_config(1, embedded_data, tmp_path, "vae=sd3"))
    with pytest.raises(FileNotFoundError, match="data.path="):
        train(stage_config(1, embedded_data, tmp_path, f"data.path={tmp_path / 'nowhere'}"))
    with pytest.raises(ValueError, match="train.batch_size=9"):
        train(stage_config(1, embedded_data, tmp_path, "train.batch_size=9", "train.grad_accum=2"))
    with pytest.raises(ValueError, match="model.overrides.num_classes=7"):
        train(stage_config(1, embedded_data, tmp_path, "+model.overrides.num_classes=7"))


def test_resume_setting_is_validated(tmp_path):
    from trainer.loop import resolve_resume

    assert resolve_resume("auto", tmp_path) is None and resolve_resume("never", tmp_path) is None
    with pytest.raises(FileNotFoundError, match="train.resume='nope.pt'"):
        resolve_resume("nope.pt", tmp_path)


def test_wandb_mode_follows_the_api_key(monkeypatch, tmp_path):
    from trainer.logger import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc from `wandb login`
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode("auto") == "offline" and wandb_mode("disabled") == "disabled"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online" and wandb_mode("offline") == "offline"
    with pytest.raises(ValueError, match="wandb.mode='of'"):
        wandb_mode("of")


def test_precision_falls_back_to_fp32_off_cuda(caplog):
    from omegaconf import OmegaConf

    from trainer.config import PrecisionSection
    from trainer.precision import Precision

    with caplog.at_level("INFO"):
        p = Precision(OmegaConf.structured(PrecisionSection(compute="bf16", fp8=True)), torch.device("cpu"))
        model = torch.nn.Sequential(torch.nn.Linear(32, 32))
        assert p.convert(model) == 0 and type(model[0]) is torch.nn.Linear
    assert p.model_dtype == torch.float32 and "fp32" in caplog.text and "nn.Linear" in caplog.text
    with p.forward():
        assert not torch.is_autocast_enabled()
    with pytest.raises(ValueError, match="precision.compute='fp16'"):
        Precision(OmegaConf.structured(PrecisionSection(compute="fp16", fp8=False)), torch.device("cpu"))


@pytest.mark.slow
def test_a_stage_lets_its_data_workers_go_when_it_returns(embedded_data, tmp_path, monkeypatch):
    """train() frees its loader iterator by refcount before it returns, and the workers are joined. Left to a later
    cyclic GC pass (the Trainer sits in reference cycles), the index queues' own finalizers may stop their feeder
    threads before the iterator's __del__ sends each worker its None, and torch then waits 5 s per worker before
    killing it: 20 s at an unrelated line of whatever runs next in the process (a sweep, a notebook, this suite)."""
    import multiprocessing
    import weakref

    from trainer.loop import Trainer

    made = []
    build = Trainer._build_data

    def build_and_keep_a_weak_reference(self):
        build(self)
        made.append(weakref.ref(self.batches))

    monkeypatch.setattr(Trainer, "_build_data", build_and_keep_a_weak_reference)
    workers_before = set(multiprocessing.active_children())
    train(stage_config(1, embedded_data, tmp_path, "train.max_steps=2", "data.num_workers=2"))
    assert len(made) == 1
    assert made[0]() is None, "the loader iterator outlived train(): its workers wait for a cyclic GC pass"
    assert set(multiprocessing.active_children()) <= workers_before
