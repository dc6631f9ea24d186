"""The evaluation split over two torchrun ranks (gloo, CPU) gives what one process gives: the sampler's parts, the
features gathered for the metrics, the validation loss's sums."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evaluation.npz import read_npz
from tests.stages import ROOT

WORKER = """
import sys, torch
from evaluation.metrics import extract
from core.ranks import join, leave
from evaluation.val_loss import ValidationLoss
from core.conditioning import ClassConditioning
from flow.objective import Uniform
from flow.rectified_flow import RectifiedFlow
from tests.eval_nets import TinyFeatures

ranks = join("cpu")
rows = ranks.gather_rows(torch.full((ranks.rank + 1, 2), float(ranks.rank)))  # 1 row from rank 0, 2 from rank 1
images = torch.load(sys.argv[1], weights_only=True).numpy()
feats = extract(images, TinyFeatures(), ranks, batch_size=2)
net = torch.nn.Conv2d(3, 3, 1)
torch.nn.init.constant_(net.weight, 0.1)
torch.nn.init.zeros_(net.bias)
batches = torch.load(sys.argv[2], weights_only=True)
val = ValidationLoss(batches, ClassConditioning(4, None, 0.0), RectifiedFlow(Uniform()), bins=3, ranks=ranks)
losses = val(lambda x, t, labels: net(x))
if ranks.is_main:
    torch.save(dict(rows=rows, feats=feats, losses=losses), sys.argv[3])
leave()
"""


def _torchrun(args: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def test_every_rank_runs_as_many_rounds_as_the_busiest():
    from core.ranks import Ranks

    assert [Ranks(r, 3).rounds(4) for r in range(3)] == [[0, 3], [1, None], [2, None]]
    assert [Ranks(r, 3).rounds(2) for r in range(3)] == [[0], [1], [None]]
    assert Ranks().rounds(3) == [0, 1, 2] and Ranks(1, 2).rounds(0) == []


@pytest.mark.slow
def test_gather_extract_and_validation_loss_over_two_ranks(tmp_path):
    from core.conditioning import ClassConditioning
    from evaluation.metrics import extract
    from evaluation.val_loss import ValidationLoss
    from flow.objective import Uniform
    from flow.rectified_flow import RectifiedFlow
    from tests.eval_nets import TinyFeatures

    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 16, 16, 3), generator=gen, dtype=torch.uint8)
    batches = [dict(latents=torch.randn(n, 3, 8, 8, generator=gen), labels=torch.zeros(n, dtype=torch.long))
               for n in (3, 2, 4)]
    torch.save(images, tmp_path / "images.pt")
    torch.save(batches, tmp_path / "batches.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    _torchrun([str(tmp_path / "worker.py"), str(tmp_path / "images.pt"), str(tmp_path / "batches.pt"),
               str(tmp_path / "out.pt")])
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["rows"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
    alone = extract(images.numpy(), TinyFeatures(), batch_size=2)
    for key, value in alone.items():
        torch.testing.assert_close(out["feats"][key], value)
    net = torch.nn.Conv2d(3, 3, 1)
    torch.nn.init.constant_(net.weight, 0.1)
    torch.nn.init.zeros_(net.bias)
    val = ValidationLoss(batches, ClassConditioning(4, None, 0.0), RectifiedFlow(Uniform()), bins=3)
    with torch.no_grad():
        expected = val(lambda x, t, labels: net(x))
    assert out["losses"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.slow
def test_sample_many_over_two_ranks_equals_one_process(stage1_checkpoint, tmp_path):
    flags = ["--model-path", str(stage1_checkpoint), "--num-samples", "5", "--batch-size", "2", "--steps", "2",
             "--device", "cpu"]
    _torchrun(["-m", "evaluation.sample_many", *flags, "--out-dir", str(tmp_path / "two")])
    from evaluation.sample_many import main

    main([*flags, "--out-dir", str(tmp_path / "one")])
    two, one = read_npz(tmp_path / "two" / "samples.npz", "two"), read_npz(tmp_path / "one" / "samples.npz", "one")
    np.testing.assert_array_equal(two["arr_0"], one["arr_0"])
    np.testing.assert_array_equal(two["arr_1"], one["arr_1"])
