"""What a resume keeps and what it takes from the new config, what it refuses; one trainer per run folder;
checkpoint writes that leave nothing half-done; Ctrl-C; the metrics file and the progress lines."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import pytest
import torch

from core import checkpoint
from core import files as core_files
from core.checkpoint import CheckpointError
from tests.stages import ROOT, stage_config
from tests.test_resume import ENV, stage1_cmd, start, wait_for_checkpoint
from trainer.errors import ConfigError
from trainer.loop import train
from trainer.optim import lr_factor
from trainer.run_lock import RunLock, RunLockedError

CPU = "device=cpu"


def _run(data, out, *args):
    return train(stage_config(1, data, out, CPU, *args))


# ---- resume semantics ---------------------------------------------------------------------------------------


def test_resume_takes_the_schedule_from_the_new_config(embedded_data, tmp_path):
    _run(embedded_data, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "optim.lr=1e-3", "optim.warmup_steps=2")
    summary = _run(embedded_data, tmp_path, "train.max_steps=6", "train.ckpt_every=2", "optim.lr=5e-4",
                   "optim.warmup_steps=2", "optim.decay_fraction=0.5", "optim.weight_decay=0.1")
    state = checkpoint.load(summary["checkpoint"])
    assert state["step"] == 6 and state["config"]["optim"]["lr"] == 5e-4
    expected = 5e-4 * lr_factor(6, warmup_steps=2, max_steps=6, decay_fraction=0.5)
    groups = state["optimizer"]["param_groups"]
    assert all(g["lr"] == pytest.approx(expected, rel=1e-12) for g in groups)
    assert state["scheduler"]["base_lrs"] == [5e-4, 5e-4]
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.1]  # decayed group follows, the other stays 0


@pytest.mark.slow
def test_resume_refuses_another_stage_another_model_and_a_smaller_max_steps(embedded_data, tmp_path):
    s2 = train(stage_config(2, embedded_data, tmp_path / "s2", CPU, "train.init_from=null", "train.max_steps=2"))
    with pytest.raises(ConfigError, match=r"Stage 2 checkpoint, but this is Stage 3.*train.init_from="):
        train(stage_config(3, embedded_data, tmp_path / "s3", CPU, "train.init_from=null",
                           f"train.resume={s2['checkpoint']}", "train.max_steps=3"))
    _run(embedded_data, tmp_path / "s1", "train.max_steps=4")
    with pytest.raises(ConfigError, match=r"at step 4, past train.max_steps=2"):
        _run(embedded_data, tmp_path / "s1", "train.max_steps=2")
    differs = r"step_00000004.pt holds a ccDiT-debug/4 .*dim: 32 in the checkpoint, 64 here"
    with pytest.raises(ConfigError, match=differs):
        _run(embedded_data, tmp_path / "s1", "train.max_steps=6", "model.overrides.dim=64")


def test_a_broken_newest_checkpoint_is_named_and_the_good_one_offered(embedded_data, tmp_path):
    _run(embedded_data, tmp_path, "train.max_steps=2")
    good = checkpoint.newest(tmp_path)
    broken = checkpoint.checkpoint_path(tmp_path / "checkpoints", 4)
    broken.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{broken.name}: the file is empty.*resume from it with "
                                              rf"train.resume={good}"):
        _run(embedded_data, tmp_path, "train.max_steps=6")


# ---- one trainer per folder ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_on_a_locked_folder_stops_naming_the_holder(embedded_data, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, '.'); from trainer.run_lock import RunLock; "
        f"lock = RunLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"host {socket.gethostname()}, pid {holder.pid}"):
            _run(embedded_data, tmp_path, "train.max_steps=1")
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): its lock went with it, and the next trainer takes the folder.
    assert _run(embedded_data, tmp_path, "train.max_steps=1")["steps"] == 1
    with RunLock(tmp_path):  # released at the end of the run
        pass


def test_prune_removes_only_dead_writers_temporaries(tmp_path):
    host = core_files.host()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        names = {
            "live": f".step_00000004.pt.tmp-{host}-{live.pid}", "dead": f".step_00000004.pt.tmp-{host}-{dead.pid}",
            "own": f".step_00000006.pt.tmp-{host}-{os.getpid()}", "remote": ".step_00000004.pt.tmp-otherhost-1",
        }
        for name in names.values():
            (tmp_path / name).write_bytes(b"partial")
        checkpoint.prune(tmp_path, keep=5)
        left = {p.name for p in tmp_path.iterdir()}
        assert left == {names["live"], names["remote"]}
    finally:
        live.kill()
        live.wait()


def test_a_failed_write_leaves_no_partial_file_and_the_old_one_intact(tmp_path, monkeypatch):
    path = tmp_path / "step_00000002.pt"
    checkpoint.save_atomic({"a": torch.ones(2)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match=r"cannot write .*step_00000002.pt: No space left on device"):
        checkpoint.save_atomic({"a": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002.pt"]
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))


def test_the_rename_is_made_durable_by_syncing_the_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    checkpoint.save_atomic({"a": torch.ones(1)}, tmp_path / "x.pt")
    assert synced == [False, True]  # the file, then the folder that holds the new name


# ---- Ctrl-C, metrics, progress ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(embedded_data, tmp_path):
    out = tmp_path / "run"
    proc = start(stage1_cmd(embedded_data, out, "train.max_steps=100000", "train.ckpt_every=5"), tmp_path / "log")
    wait_for_checkpoint(proc, out / "checkpoints")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 0, (tmp_path / "log").read_text()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preempted"] is True
    assert checkpoint.load(summary["checkpoint"])["step"] == summary["steps"]


@pytest.mark.slow
def test_metrics_file_has_every_step_once_after_a_resume(embedded_data, tmp_path):
    _run(embedded_data, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1")
    checkpoint.checkpoint_path(tmp_path / "checkpoints", 4).unlink()  # as if killed after step 4's log line
    _run(embedded_data, tmp_path, "train.max_steps=4", "train.ckpt_every=2", "train.log_every=1")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
    assert {"train/loss", "train/grad_norm", "train/lr", "train/img_per_s", "train/max_rss_gb"} <= set(rows[1])
    assert [r["step"] for r in rows if "held/loss_start" in r] == [0]


@pytest.mark.slow
def test_without_a_terminal_progress_is_a_line_per_log_step(embedded_data, tmp_path):

    proc = subprocess.run(stage1_cmd(embedded_data, tmp_path, "train.max_steps=4", "train.log_every=2"), cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stage 1: step")]
    assert [line.split()[3] for line in lines] == ["2/4", "4/4"], proc.stderr[-2000:]
    assert "\r" not in proc.stderr
