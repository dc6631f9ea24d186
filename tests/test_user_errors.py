"""User errors that reached the user as tracebacks (issue 25, item 11; docs/HOSTILE_INPUTS.md): each is now one
clear line naming the key, flag or file, and the training CLI exits with status 2 as the README promises.

The references are what the input is, independent of the code: the data's class count, the file system (a file
where a folder is asked for, /proc), the schema's own keys, the shapes of the weights a checkpoint holds."""

import copy
import errno
import os
import subprocess
import sys

import pytest
import torch

from app.sample import main as sample_main
from core import checkpoint
from core.checkpoint import CheckpointError
from tests.stages import ROOT, TINY, stage_config
from trainer.cli import run_stage

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def stage1(data, out, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train_stage1.py", "experiment=embedded", f"embedded_data={data}", f"train.out_dir={out}",
           *TINY, "train.max_steps=1", "device=cpu", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1, output[-3000:]
    for word in words:
        assert word in errors[0], errors[0]


# ---- the training CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "words"), [
    ("+train.bach_size=64", ["train.bach_size: not a key of the config", "did you mean train.batch_size?"]),
    ("+model.overrides.dimm=64", ["model.overrides.dimm: not a key", "did you mean model.overrides.dim?"]),
    ("train.preview.labels=[0,9]", ["train.preview.labels [9] out of range 0..4", "data.path="]),
], ids=["typo", "model-field-typo", "preview-label"])
def test_a_user_error_is_one_error_line_and_exit_2(embedded_data, tmp_path, override, words):
    """The embedded Stage 1 data has 4 classes (0..3, 4 the null class): label 9 is none of them."""
    assert_one_error_line(stage1(embedded_data, tmp_path / "run", override), *words)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("where", ["below-a-file", "in-proc", "proc-itself"])
def test_an_out_dir_hydra_cannot_create_is_one_error_line(embedded_data, tmp_path, where):
    """Hydra creates train.out_dir before the run starts; these used to fail inside it with a traceback."""
    (tmp_path / "file").write_text("")
    out = {"below-a-file": tmp_path / "file" / "run", "in-proc": "/proc/rfdit-run", "proc-itself": "/proc"}[where]
    assert_one_error_line(stage1(embedded_data, out), f"train.out_dir={out}: ")


@pytest.mark.parametrize("fmt", ["file", "sharded"])
def test_a_full_disk_during_a_checkpoint_is_one_error_line(embedded_data, tmp_path, monkeypatch, caplog, fmt):
    """What train_stageN.py runs, with every torch.save failing as on a full disk (the file format's atomic write
    and DCP's writer both call it): exit 2, one ERROR line, and nothing half-written left behind."""

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    cfg = stage_config(1, embedded_data, tmp_path, "device=cpu", f"train.checkpoint_format={fmt}",
                       "train.eval_batches=0")
    monkeypatch.setattr(torch, "save", disk_full)
    with caplog.at_level("ERROR", logger="trainer"), pytest.raises(SystemExit) as stopped:
        run_stage(cfg)
    monkeypatch.undo()
    assert stopped.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "trainer"]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "intact" in errors[0], errors
    assert checkpoint.list_checkpoints(tmp_path / "checkpoints") == []


# ---- app/sample.py -------------------------------------------------------------------------------------------


def test_sample_out_dir_that_is_a_file_is_refused_before_drawing(stage1_checkpoint, tmp_path, monkeypatch):
    import app.pipeline

    drawn = []
    monkeypatch.setattr(app.pipeline.Pipeline, "generate", lambda *a, **k: drawn.append(1))
    (tmp_path / "file").write_text("")
    for out in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(SystemExit, match=rf"--out-dir {out}: {tmp_path / 'file'} is a file"):
            sample_main(["--model-path", str(stage1_checkpoint), "--out-dir", str(out), "--steps", "2"])
    assert drawn == []


def _tampered(source, tmp_path, change) -> str:
    state = torch.load(source, map_location="cpu", weights_only=True)
    state = copy.deepcopy(state)
    change(state["metadata"])
    path = tmp_path / "tampered.pt"
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(("change", "words"), [
    (lambda m: m["model"].update(bogus=1), "metadata.model is not a model this repository builds"),
    (lambda m: m["model"].update(dim="abc"), "metadata.model is not a model this repository builds"),
    (lambda m: m["model"].update(dim=64), "does not describe the ema weights it holds"),
    (lambda m: m["model"].update(depth=-3), "does not describe the ema weights it holds"),
    (lambda m: m["model"].update(dim=4096, depth=400), "does not describe the ema weights it holds"),
    (lambda m: m.update(prediction="banana"), "metadata.prediction is 'banana', not one of velocity, x"),
], ids=["unknown-field", "wrong-type", "other-width", "negative-depth", "huge", "prediction"])
def test_a_tampered_metadata_is_one_line_naming_the_checkpoint(stage1_checkpoint, tmp_path, change, words):
    """The weights the file holds are the reference: a metadata.model that does not build them is refused on the
    meta device, before a model of its size is allocated (4096 x 400 blocks would be 80 GB of fp32)."""
    path = _tampered(stage1_checkpoint, tmp_path, change)
    with pytest.raises(SystemExit, match=rf"--model-path {path}: .*") as stopped:
        sample_main(["--model-path", path, "--out-dir", str(tmp_path / "out"), "--steps", "2"])
    assert words in str(stopped.value) and len(str(stopped.value).splitlines()) == 1
    if "prediction" not in words:
        with pytest.raises(CheckpointError, match=rf"{path}: .*{words}"):
            checkpoint.load_model(path)
