"""Every stage's entrypoint from the command line, chained as the curriculum runs them: train_stage1.py ->
reparameterize.py stage1-to-stage2 -> train_stage2.py -> train_stage3.py -> train_stage4.py (40 px) ->
train_stage5.py (48 px), two steps each on the embedded data, each stage starting from the previous one."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core import checkpoint
from tests.stages import ROOT, TINY

ENV = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
BASE_GRID = 8  # stage 1-3 data is 32 px: 8x8 tokens of 4x4 pixels


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def run_ok(cmd: list[str]) -> None:
    proc = run(cmd)
    assert proc.returncode == 0, f"{cmd[1]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def train_cmd(stage: int, data: Path, out: Path, *overrides: str) -> list[str]:
    return [sys.executable, f"train_stage{stage}.py", "experiment=embedded", f"embedded_data={data}",
            f"train.out_dir={out}", *TINY, "train.max_steps=2", "train.eval_batches=0", *overrides]


def initialised_from(out: Path, stage: int) -> list[str]:
    """The checkpoints a run logged it took its first weights from (builders.apply_initial_weights)."""
    return re.findall(r"initialised from (\S+) \(ema weights\)", (out / f"train_stage{stage}.log").read_text())


@pytest.mark.slow
def test_the_curriculum_runs_stage_by_stage_from_the_command_line(embedded_data, tmp_path):
    # Started first, checked last: a misspelt key stops a stage before it spends anything.
    typo = subprocess.Popen(train_cmd(1, embedded_data, tmp_path / "typo", "train.no_such_key=1"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {n: tmp_path / f"stage{n}" for n in range(1, 6)}

    run_ok(train_cmd(1, embedded_data, out[1]))
    stage1 = checkpoint.newest(out[1])
    init = out[2] / "init.pt"
    run_ok([sys.executable, "reparameterize.py", "stage1-to-stage2", "--src", str(stage1), "--dst", str(init),
            "--text-dim", "384", "--text-len", "32"])
    assert checkpoint.load(init)["metadata"]["model"]["family"] == "mmdit"
    run_ok(train_cmd(2, embedded_data, out[2], f"train.init_from={init}"))
    assert initialised_from(out[2], 2) == [str(init)]
    for n in (3, 4, 5):  # each from the previous stage's out_dir, i.e. its newest checkpoint
        run_ok(train_cmd(n, embedded_data, out[n], f"train.init_from={out[n - 1]}"))
        assert initialised_from(out[n], n) == [str(checkpoint.newest(out[n - 1]))]

    patches = {1: 4, 2: 4, 3: 4, 4: 5, 5: 6}  # 32, 40, 48 px: the patch grows with the image, 8x8 tokens throughout
    for n, patch in patches.items():
        ckpts = checkpoint.list_checkpoints(out[n] / "checkpoints")
        assert [p.name for p in ckpts] == ["step_00000002.pt"], n
        state = checkpoint.load(ckpts[-1])
        meta, model = state["metadata"], state["metadata"]["model"]
        assert meta["stage"] == n and state["step"] == 2 and len(state["history"]) == 2
        assert meta["family"] == ("ccdit" if n == 1 else "mmdit")
        assert meta["conditioning"] == ("class" if n == 1 else "text")
        assert model["patch"] == patch and model["input_size"] == BASE_GRID * patch == meta["image_size"], (n, model)
        # base_grid is Stage 1's 8x8 throughout: the 7x9 buckets of 40 and 48 px interpolate its positions per axis.
        assert model["base_grid"] == BASE_GRID, (n, model)
        assert (out[n] / ".hydra" / "config.yaml").is_file() and (out[n] / "summary.json").is_file()
    resampled = (out[4] / "train_stage4.log").read_text() + (out[5] / "train_stage5.log").read_text()
    assert "patch 4 -> 5 (token grid 8 kept)" in resampled and "patch 5 -> 6 (token grid 8 kept)" in resampled

    output, _ = typo.communicate(timeout=120)
    assert typo.returncode != 0
    # The typed schema (trainer/config.py) names the section the key is not in.
    assert "Could not override 'train.no_such_key'" in output and "Key 'no_such_key' not in 'TrainSection'" in output
    assert not (tmp_path / "typo" / "checkpoints").exists()
