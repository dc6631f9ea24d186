"""Transformer Engine FP8 on a GPU (`pytest -m gpu`): te.Linear against bf16 within FP8 tolerance, the weight
layout round trip, fused wgrad into main_grad, and DDP with FP8 leaving the ranks identical. Skipped with a
reason on machines without CUDA (tests/conftest.py) or without TE."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model, convert_linears
from models.linear import make_linear
from tests.helpers import randomize_zero_inits
from tests.stages import ROOT
from trainer.main_grad import MainGrads
from trainer.precision import fp8_recipe

pytestmark = pytest.mark.gpu


def _te():
    return pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_model_output_is_within_fp8_tolerance_of_bf16():
    te = _te()
    ref = build_model("mmDiT-S/2").cuda()
    randomize_zero_inits(ref, std=0.02)
    model = build_model("mmDiT-S/2").cuda()
    model.load_state_dict(ref.state_dict())
    assert convert_linears(model, "fp8", "cuda") > 0
    x, t = torch.randn(4, 16, 32, 32, device="cuda"), torch.rand(4, device="cuda")
    text, mask = torch.randn(4, 120, 2048, device="cuda"), torch.ones(4, 120, dtype=torch.bool, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = ref(x, t, text, mask)
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe("auto", torch.device("cuda"))):
            b = model(x, t, text, mask)
    # E4M3 keeps 3 mantissa bits (relative step 2^-4 per value); over 12 blocks of sums the output's relative
    # error stays a few percent. 10% catches a wrong layout or scale, which is O(1).
    assert _rel_err(b, a) < 0.1


def test_te_linear_nn_linear_layout_round_trip():
    _te()
    torch_layer = nn.Linear(64, 128).cuda()
    te_layer = make_linear(64, 128, backend="te", fuse_wgrad_accumulation=True).cuda()
    te_layer.load_state_dict(torch_layer.state_dict(), strict=False)  # TE adds only _extra_state
    back = nn.Linear(64, 128).cuda()
    back.load_state_dict({k: v for k, v in te_layer.state_dict().items() if not k.endswith("_extra_state")})
    assert torch.equal(back.weight, torch_layer.weight) and torch.equal(back.bias, torch_layer.bias)
    x = torch.randn(8, 64, device="cuda")
    torch.testing.assert_close(te_layer(x), torch_layer(x), rtol=1e-3, atol=1e-3)


def test_fused_wgrad_goes_to_main_grad_only():
    _te()
    layer = make_linear(64, 128, backend="te", fuse_wgrad_accumulation=True).cuda()
    ref = nn.Linear(64, 128).cuda()
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")})
    grads = MainGrads(layer)
    x = torch.randn(8, 64, device="cuda")
    layer(x).square().sum().backward()
    ref(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None
    torch.testing.assert_close(layer.weight.main_grad, ref.weight.grad, rtol=1e-3, atol=1e-3)
    grads.to_grad()
    assert layer.weight.grad is layer.weight.main_grad


def test_ddp_with_fp8_layers_leaves_ranks_identical(tmp_path):
    """Two ranks: NCCL with two GPUs, gloo with both ranks on one GPU (NCCL refuses a shared device)."""
    _te()
    worker = Path(__file__).with_name("main_grad_worker.py")
    out = tmp_path / "te"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), "--out", str(out), "--te"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
