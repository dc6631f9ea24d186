"""scripts/slurm/train_multi_node.sbatch picks train.parallel from PARALLEL: run with stand-ins for srun and
scontrol that record what they are given, as the job's shell would on a cluster."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm" / "train_multi_node.sbatch"


@pytest.fixture
def job(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho node1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    (tmp_path / "train_stage2.py").write_text("")
    slurm = dict(SLURM_JOB_ID="7", SLURM_NNODES="4", SLURM_JOB_NODELIST="node[1-4]", SLURM_CPUS_ON_NODE="16",
                 SLURM_SUBMIT_DIR=str(tmp_path), SRUN_ARGS=str(tmp_path / "srun.args"))

    def submit(*args: str, **env: str) -> tuple[int, list[str], str]:
        (tmp_path / "srun.args").unlink(missing_ok=True)
        base = {k: v for k, v in os.environ.items() if k not in ("PARALLEL", "GPUS_PER_NODE")}
        path = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
        proc = subprocess.run(["bash", str(SCRIPT), "train_stage2.py", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, env=base | slurm | env | path)
        given = (tmp_path / "srun.args").read_text().splitlines() if (tmp_path / "srun.args").exists() else []
        return proc.returncode, given[given.index("train_stage2.py") + 1:] if given else [], proc.stderr

    return submit


def test_parallel_selects_hsdp_with_one_node_per_shard_group(job):
    rc, overrides, _ = job("train.batch_size=320", PARALLEL="hsdp")
    assert rc == 0
    assert overrides == ["train.batch_size=320", "train.resume=auto", "train.parallel=hsdp", "train.hsdp_shard_size=8"]
    rc, overrides, _ = job(PARALLEL="hsdp", GPUS_PER_NODE="4")
    assert overrides[-1] == "train.hsdp_shard_size=4"


def test_ddp_by_default_an_explicit_argument_wins_and_a_wrong_value_stops(job):
    assert job()[1] == ["train.resume=auto", "train.parallel=ddp"]
    assert job("train.parallel=fsdp", PARALLEL="hsdp")[1] == ["train.parallel=fsdp", "train.resume=auto"]
    assert job("train.hsdp_shard_size=2", PARALLEL="hsdp")[1] == [
        "train.hsdp_shard_size=2", "train.resume=auto", "train.parallel=hsdp"]
    rc, _, err = job(PARALLEL="zero3")
    assert rc == 2 and "PARALLEL=zero3: expected ddp, fsdp or hsdp" in err
