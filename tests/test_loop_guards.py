"""The loop's guards: a step with a non-finite loss or gradient is skipped (weights, EMA and optimizer state
untouched) and training goes on; train.max_bad_steps such steps in a row stop the run with an error naming
the last checkpoint; train.resume and the batch split are validated."""

import math
import re

import pytest
import torch

import flow.rectified_flow as objective
from core import checkpoint
from tests.stages import stage_config
from trainer.builders import micro_batch_size
from trainer.loop import resolve_resume, train

CPU = "device=cpu"  # the bitwise comparisons below are CPU promises


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


@pytest.fixture
def poison(monkeypatch):
    """poison({step: "nan" | "inf_grad"}): the training loss of those (1-based) steps goes bad. Training calls
    run with grad enabled; the held-out loss (no_grad) is left alone."""
    real = objective.flow_matching_loss
    plan, calls = {}, []

    def loss(*args, **kwargs):
        value = real(*args, **kwargs)
        if not torch.is_grad_enabled():
            return value
        calls.append(1)  # grad_accum=1: call k is step k
        kind = plan.get(len(calls))
        if kind == "nan":
            return value * math.nan
        if kind == "inf_grad":
            return _InfGrad.apply(value)
        return value

    monkeypatch.setattr(objective, "flow_matching_loss", loss)
    return plan.update


def _by_step(out_dir) -> dict[int, dict]:
    return {int(re.search(r"(\d+)", p.name)[1]): checkpoint.load(p)
            for p in checkpoint.list_checkpoints(out_dir / "checkpoints")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _optimizer_tensors(state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in state["optimizer"]["state"].items() for k, v in s.items()}


def test_bad_steps_are_skipped_and_training_goes_on(embedded_data, tmp_path, poison, caplog):
    poison({3: "nan", 4: "inf_grad"})
    with caplog.at_level("WARNING", logger="trainer.loop"):
        summary = train(stage_config(1, embedded_data, tmp_path, CPU, "train.max_steps=6", "train.ckpt_every=1",
                                     "train.keep_checkpoints=10"))
    assert summary["steps"] == 6 and math.isfinite(summary["final_loss"])
    assert "step 3: non-finite loss" in caplog.text and "(2 in a row)" in caplog.text
    ckpts = _by_step(tmp_path)
    assert sorted(ckpts) == [1, 2, 3, 4, 5, 6]
    history = ckpts[6]["history"]
    assert math.isnan(history[2]) and math.isfinite(history[3])  # step 4's loss was fine, its gradient not
    assert all(math.isfinite(history[i]) for i in (0, 1, 4, 5))
    assert [ckpts[s]["bad_in_row"] for s in range(1, 7)] == [0, 0, 1, 2, 0, 0]

    # Across the skipped steps 3 and 4 nothing that training updates changed...
    for s in (3, 4):
        assert _equal(ckpts[s]["model"], ckpts[2]["model"]) and _equal(ckpts[s]["ema"], ckpts[2]["ema"]), s
        assert _equal(_optimizer_tensors(ckpts[s]), _optimizer_tensors(ckpts[2])), s
    # ...while a good step does change them, and to finite values (no NaN gradient leaked into step 5).
    for s in (2, 5, 6):
        assert not _equal(ckpts[s]["model"], ckpts[s - 1]["model"]), s
    assert all(torch.isfinite(v).all() for v in ckpts[6]["model"].values())
    assert all(torch.isfinite(v).all() for v in ckpts[6]["ema"].values())


def test_too_many_bad_steps_in_a_row_stop_with_the_last_good_checkpoint(embedded_data, tmp_path, poison):
    poison(dict.fromkeys(range(3, 11), "nan"))
    cfg = stage_config(1, embedded_data, tmp_path, CPU, "train.max_steps=10", "train.ckpt_every=2",
                       "train.max_bad_steps=3", "train.keep_checkpoints=10")
    with pytest.raises(RuntimeError, match=r"3 consecutive steps \(to step 5\)") as err:
        train(cfg)
    assert "train.max_bad_steps=3" in str(err.value)
    last = checkpoint.checkpoint_path(tmp_path / "checkpoints", 4)
    assert f"Last good checkpoint: {last}." in str(err.value)
    ckpts = _by_step(tmp_path)
    assert sorted(ckpts) == [2, 4]  # the run stopped at step 5, before any later save
    # It loads, and holds the weights of step 2: steps 3 and 4 were skipped.
    assert ckpts[4]["step"] == 4 and _equal(ckpts[4]["model"], ckpts[2]["model"])
    model, _ = checkpoint.load_model(last)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# Skipping step 1 means the scheduler steps before the optimizer ever has: torch warns, by design here (the
# schedule follows the step count, skipped steps included).
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_bad_steps_before_any_checkpoint_say_so(embedded_data, tmp_path, poison):
    poison({1: "nan", 2: "inf_grad"})
    with pytest.raises(RuntimeError, match="2 consecutive steps .*Last good checkpoint: none yet"):
        train(stage_config(1, embedded_data, tmp_path, CPU, "train.max_steps=4", "train.max_bad_steps=2"))
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints") == []


def test_resume_picks_the_newest_checkpoint_by_step(tmp_path):
    for name in ("step_00000002.pt", "step_00000010.pt", "step_9.pt", ".step_00000012.pt.tmp-123", "notes.pt"):
        (tmp_path / name).write_bytes(b"")
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000010.pt"
    assert resolve_resume("never", tmp_path) is None
    assert resolve_resume(str(tmp_path / "step_9.pt"), tmp_path) == tmp_path / "step_9.pt"
    with pytest.raises(FileNotFoundError, match="not 'auto', 'never' or an existing checkpoint file"):
        resolve_resume(str(tmp_path), tmp_path)  # a folder is not a checkpoint
    with pytest.raises(FileNotFoundError, match="train.resume='Auto'"):
        resolve_resume("Auto", tmp_path)


@pytest.mark.slow
def test_resume_never_a_path_and_a_finished_run(embedded_data, tmp_path, caplog):
    args = ("train.max_steps=4", "train.ckpt_every=2")
    train(stage_config(1, embedded_data, tmp_path, CPU, *args))
    ckpts = checkpoint.list_checkpoints(tmp_path / "checkpoints")
    full = checkpoint.load(ckpts[-1])

    # A finished run rerun with resume=auto does no step and leaves its checkpoint as it was.
    with caplog.at_level("INFO", logger="trainer.loop"):
        again = train(stage_config(1, embedded_data, tmp_path, CPU, *args))
    assert f"resumed from {ckpts[-1]} at step 4\n" in caplog.text
    assert again["steps"] == 4 and again["preempted"] is False
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints") == ckpts
    assert _equal(checkpoint.load(ckpts[-1])["model"], full["model"])

    # An explicit checkpoint resumes from it even when newer ones exist, and replays the same steps.
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.loop"):
        train(stage_config(1, embedded_data, tmp_path, CPU, *args, f"train.resume={ckpts[0]}"))
    assert f"resumed from {ckpts[0]} at step 2\n" in caplog.text
    replayed = checkpoint.load(ckpts[-1])
    assert replayed["history"] == full["history"] and _equal(replayed["model"], full["model"])

    # never: starts over from step 1 although checkpoints are there (and reaches the same weights again).
    caplog.clear()
    with caplog.at_level("INFO", logger="trainer.loop"):
        summary = train(stage_config(1, embedded_data, tmp_path, CPU, *args, "train.resume=never"))
    assert "resumed" not in caplog.text and summary["held_loss_start"] is not None
    assert _equal(checkpoint.load(ckpts[-1])["model"], full["model"])


@pytest.mark.parametrize(("batch", "world", "accum", "micro"), [(8, 1, 1, 8), (8, 2, 1, 4), (8, 1, 2, 4), (8, 2, 2, 2)])
def test_micro_batch_size_splits_the_global_batch(batch, world, accum, micro):
    assert micro_batch_size(batch, world, accum) == micro


@pytest.mark.parametrize(("batch", "world", "accum"), [(8, 3, 1), (8, 1, 3), (8, 2, 3), (8, 1, 0), (8, 1, -2)])
def test_micro_batch_size_rejects_an_uneven_split(batch, world, accum):
    with pytest.raises(ValueError, match=rf"train.batch_size={batch} must split evenly over {world} ranks x "
                                         rf"train.grad_accum={accum} micro-batches"):
        micro_batch_size(batch, world, accum)
