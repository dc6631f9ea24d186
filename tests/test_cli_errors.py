"""What a user sees when they get a setting wrong: one clear line naming the key and what it must be, and a
non-zero exit, never a traceback; tracebacks are for bugs."""

import os
import subprocess
import sys

import pytest

from tests.stages import ROOT, TINY, stage_config
from trainer.loop import train

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def stage1(data, out, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train_stage1.py", "experiment=embedded", f"embedded_data={data}", f"train.out_dir={out}",
           *TINY, "train.max_steps=1", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("override", "words"),
    [
        ("train.batch_size=abc", ["train.batch_size", "could not be converted to Integer"]),  # the schema's type
        ("optim.lr=1e38", ["optim.lr=1e+38: expected a finite number in (0, 1]"]),  # the range check
        ("train.label_dropout=1.5", ["train.label_dropout=1.5: expected a probability in [0, 1]"]),
        ("data.path=/no/such/folder", ["data.path='/no/such/folder'", "manifest"]),
        ("train.grad_accum=3", ["train.batch_size=8 must split evenly over 1 ranks x train.grad_accum=3"]),
    ],
)
def test_a_user_error_is_one_clear_line_and_a_non_zero_exit(embedded_data, tmp_path, override, words):
    proc = stage1(embedded_data, tmp_path, override)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    for word in words:
        assert word in output, output[-2000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_a_global_batch_larger_than_the_data_says_so(embedded_data, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        train(stage_config(1, embedded_data, tmp_path, "device=cpu", "train.batch_size=256", "train.max_steps=1",
                           "train.eval_batches=0"))
    assert "train.batch_size=256 is larger than" in caplog.text and "every step repeats records" in caplog.text
