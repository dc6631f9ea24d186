"""Data parallelism: two torchrun ranks (gloo, CPU) train exactly what one process does with the same global
batch split into two micro-batches (trainer/loop.py's determinism contract, data/loader.py's slots).

Rank r with no loader workers owns slot r and seeds its draws with virtual rank r; one process with
grad_accum=2 and two loader workers takes micro-batch m from worker m (slot m) and seeds it with virtual
rank m. So both see the same samples, noise, times and dropout, and differ only in the order the two
micro-batches' gradients are summed (all-reduce vs accumulation)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core import checkpoint
from tests.stages import ROOT, TINY

STEPS = 4

# Runs train_stage1.py as torchrun would, then saves the weights this rank ended with (only rank 0 writes
# checkpoints, so this is how rank 1's weights become observable).
DUMP_WEIGHTS = """
import os, runpy, sys
sys.path.insert(0, os.getcwd())
import torch
import trainer.loop as loop

built = []
_build_model = loop.build_model

def build_model(*args, **kwargs):
    built.append(_build_model(*args, **kwargs))
    return built[-1]

loop.build_model = build_model
sys.argv[0] = os.path.join(os.getcwd(), "train_stage1.py")
runpy.run_path(sys.argv[0], run_name="__main__")
torch.save(built[0].state_dict(), os.path.join(sys.argv[-1].split("=", 1)[1], f"rank{os.environ['RANK']}.pt"))
"""


def _run(cmd: list[str], out: Path) -> None:
    env = dict(os.environ, HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert (out / ".hydra" / "config.yaml").is_file()


def _overrides(data: Path, *extra: str) -> list[str]:
    # device=cpu: gloo on the CPU even where CUDA is present (two ranks need not find two GPUs).
    return ["experiment=embedded", f"embedded_data={data}", *TINY, "device=cpu", f"train.max_steps={STEPS}",
            "train.ckpt_every=1",
            f"train.keep_checkpoints={STEPS}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("stage, extra", [(1, ()), (4, ("train.init_from=null", "optim.lr=1e-3"))],
                         ids=["stage1-labels", "stage4-buckets-features"])
def test_two_ranks_equal_one_process_with_two_micro_batches(embedded_data, tmp_path, stage, extra):
    """Stage 1 on class labels, and Stage 4 on aspect-ratio buckets with stored text features (caption dropout,
    long and short captions): both ranks draw the same bucket at every step, as the two workers do."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    wrapper = tmp_path / "dump_weights.py"
    wrapper.write_text(DUMP_WEIGHTS.replace("train_stage1.py", f"train_stage{stage}.py"))
    # train.out_dir last: the wrapper reads it from argv[-1] to know where to put the per-rank weights.
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
          *_overrides(embedded_data, "data.num_workers=0", *extra), f"train.out_dir={ddp}"], ddp)
    _run([sys.executable, f"train_stage{stage}.py",
          *_overrides(embedded_data, "data.num_workers=2", "train.grad_accum=2", *extra), f"train.out_dir={single}"],
         single)

    a_ckpts = checkpoint.list_checkpoints(ddp / "checkpoints")
    b_ckpts = checkpoint.list_checkpoints(single / "checkpoints")
    assert [p.name for p in a_ckpts] == [p.name for p in b_ckpts] == [f"step_{s:08d}.pt" for s in range(1, STEPS + 1)]
    for pa, pb in zip(a_ckpts, b_ckpts, strict=True):
        a, b = checkpoint.load(pa), checkpoint.load(pb)
        # The runs really were set up differently: 2 ranks x 4 samples vs 1 rank x 2 workers x 4 samples.
        assert (a["loader"]["world_size"], a["loader"]["num_workers"]) == (2, 0)
        assert (b["loader"]["world_size"], b["loader"]["num_workers"]) == (1, 2)
        assert a["history"] == pytest.approx(b["history"], rel=1e-6, abs=0)
        for key in ("model", "ema"):
            assert a[key].keys() == b[key].keys()
            for name in a[key]:
                torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=1e-6, msg=f"{pa.name} {key}.{name}")

    # The tolerance is meaningful: training moves the weights far more than the tolerance between steps 1 and 4.
    first, last = checkpoint.load(a_ckpts[0])["model"], checkpoint.load(a_ckpts[-1])["model"]
    assert max((first[k] - last[k]).abs().max().item() for k in first) > 1e-3
    assert len(set(checkpoint.load(a_ckpts[-1])["history"])) == STEPS

    # INFO lines come from rank 0 only (both ranks append to the same Hydra log file).
    name = "ccDiT-debug/4" if stage == 1 else "mmDiT-debug/5"  # Stage 4's patch grows with the image (40 px: 5)
    assert (ddp / f"train_stage{stage}.log").read_text().count(f"stage {stage}: {name}") == 1

    # Both ranks ended with identical weights, and they are the ones rank 0 saved.
    rank0, rank1 = (torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        assert torch.equal(rank0[name], last[name]), name
