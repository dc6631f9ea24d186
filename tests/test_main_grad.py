"""Fused wgrad accumulation under DDP (trainer/main_grad.py), on CPU with a stand-in for te.Linear that keeps
TE's contract: the weight gradient goes into weight.main_grad and autograd gets None for the weight.

Two gloo ranks x 2 micro-batches must end with identical weights, equal to one process on the same global
batch, equal in turn to an ordinary nn.Linear; without MainGrads.reduce (the reference's bug) the
ranks drift apart."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.stages import ROOT

WORKER = Path(__file__).with_name("main_grad_worker.py")


def _run(out: Path, *flags: str, ranks: int = 1) -> list[dict[str, torch.Tensor]]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *launcher, str(WORKER), "--out", str(out), *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return [torch.load(out / f"rank{r}.pt") for r in range(ranks)]


def _assert_equal(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m, k=k: f"{k}: {m}", **tol)


@pytest.mark.slow
def test_ddp_reduces_main_grad_and_ranks_stay_identical(tmp_path):
    rank0, rank1 = _run(tmp_path / "ddp", ranks=2)
    (single,) = _run(tmp_path / "single")
    (plain,) = _run(tmp_path / "plain", "--plain")
    _assert_equal(rank0, rank1, rtol=0, atol=0)  # bitwise: every rank stepped on the same reduced gradient
    # Same global batch: the all-reduced mean over 2 ranks x 2 micro-batches is the one process's mean.
    _assert_equal(rank0, single, rtol=1e-12, atol=1e-12)
    # And the stand-in's main_grad path reproduces autograd's .grad, through clipping and AdamW.
    _assert_equal(single, plain, rtol=1e-12, atol=1e-12)
    init = {k: v.double() for k, v in _initial_weights().items()}
    assert not torch.allclose(single["2.weight"], init["2.weight"]), "the fused-wgrad weight never moved"


@pytest.mark.slow
def test_without_the_main_grad_all_reduce_ranks_drift(tmp_path):
    """The negative control: DDP alone never reduces a weight whose gradient lives in main_grad."""
    rank0, rank1 = _run(tmp_path / "bug", "--no-reduce", ranks=2)
    # The weight whose gradient lives in main_grad differs; through the clip (a local norm) and the next
    # forward the drift then spreads to every other parameter too.
    assert not torch.allclose(rank0["2.weight"], rank1["2.weight"], rtol=1e-3, atol=1e-6)


def _initial_weights() -> dict[str, torch.Tensor]:
    sys.path.insert(0, str(WORKER.parent))
    from tests.main_grad_worker import build

    return build(False, torch.device("cpu"), plain=True).state_dict()


@pytest.mark.parametrize("world", [1, 3])
def test_main_grads_views_share_one_flat_buffer(world):
    from tests.main_grad_worker import build
    from trainer.main_grad import MainGrads

    model = build(False, torch.device("cpu"))
    grads = MainGrads(model, world)
    assert grads.names == ["2.weight"]
    w = model[2].weight
    assert w.main_grad.dtype == w.dtype == torch.float64 and w.main_grad.data_ptr() == grads.flat.data_ptr()
    w.main_grad.fill_(2.0)
    grads.to_grad()
    assert w.grad is w.main_grad
    with pytest.raises(RuntimeError, match="counted twice"):
        grads.to_grad()
    grads.zero()
    assert torch.count_nonzero(w.grad) == 0
