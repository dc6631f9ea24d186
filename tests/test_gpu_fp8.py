"""Transformer Engine FP8 on a GPU (`pytest -m gpu`): te.Linear against bf16 within FP8 tolerance, the weight
layout round trip, fused wgrad into main_grad, and DDP with FP8 leaving the ranks identical. Skipped with a
reason on machines without CUDA (tests/conftest.py) or without TE.

The first three run their bodies twice: as `gpu` tests with the real TE on CUDA, and on the CPU against
tests/te_standin.py (installed as `transformer_engine.pytorch`, on a Hopper or a Blackwell), so a body that breaks
TE's contract (its shape rule, its TF32 GEMMs) fails here before anyone reaches a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from models import build_model, convert_linears
from models.linear import make_linear
from tests import te_standin
from tests.helpers import randomize_zero_inits
from tests.stages import ROOT
from trainer.main_grad import MainGrads
from trainer.precision import fp8_recipe, text_pad_multiple

STAND_IN_GPUS = pytest.mark.parametrize("gpu", [(9, 0), (10, 0)], ids=["hopper", "blackwell"])

TF32_UNIT = 2.0**-10
"""TF32 keeps 10 explicit mantissa bits: converting an fp32 operand changes it by at most 2^-10 of its value (2^-11
when rounded to nearest; 2^-10 covers truncation too). TE runs pure-fp32 GEMMs as TF32 (common/gemm/cublaslt_gemm.cu,
cited in tests/te_standin.py); torch's reference here runs IEEE fp32 (torch.backends.cuda.matmul.allow_tf32 is off
by default)."""


def _te():
    return pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def tf32_matmul_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on the difference between two computations of a @ b, each from TF32 or fp32 operands with
    fp32 accumulation: against the exact product, each term carries at most 2 x TF32_UNIT of relative error from
    its rounded operands and the K-term fp32 sum at most K x 2^-24; twice that covers both sides."""
    k = a.shape[-1]
    return 2 * (2 * TF32_UNIT + k * 2.0**-24) * (a.double().abs() @ b.double().abs())


# ---- the bodies ---------------------------------------------------------------------------------------------------


def fp8_output_error(te, device: torch.device) -> float:
    """mmDiT-S/2 with its large linears in FP8 (the GPU's `auto` recipe) against the same weights in bf16, at batch 4
    with 120 caption tokens. Caption keys are padded as an FP8 run pads them (trainer/builders.py): unpadded, the
    cross-attention K/V rows are 4 x 121 = 484, which no FP8 recipe takes (8 divides neither it nor 121)."""
    ref = build_model("mmDiT-S/2", text_pad_multiple=text_pad_multiple("auto")).to(device)
    randomize_zero_inits(ref, std=0.02)
    model = build_model("mmDiT-S/2", text_pad_multiple=text_pad_multiple("auto")).to(device)
    model.load_state_dict(ref.state_dict())
    assert convert_linears(model, "fp8", device) > 0
    gen = torch.Generator(device).manual_seed(0)
    x, t = torch.randn(4, 16, 32, 32, device=device, generator=gen), torch.rand(4, device=device, generator=gen)
    text = torch.randn(4, 120, 2048, device=device, generator=gen)
    mask = torch.ones(4, 120, dtype=torch.bool, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        a = ref(x, t, text, mask)
        with te.fp8_autocast(enabled=True, fp8_recipe=fp8_recipe("auto", device)):
            b = model(x, t, text, mask)
    return _rel_err(b, a)


def check_layout_round_trip(device: torch.device) -> None:
    torch_layer = nn.Linear(64, 128).to(device)
    te_layer = make_linear(64, 128, backend="te", fuse_wgrad_accumulation=True).to(device)
    te_layer.load_state_dict(torch_layer.state_dict(), strict=False)  # TE adds only _extra_state
    back = nn.Linear(64, 128).to(device)
    back.load_state_dict({k: v for k, v in te_layer.state_dict().items() if not k.endswith("_extra_state")})
    assert torch.equal(back.weight, torch_layer.weight) and torch.equal(back.bias, torch_layer.bias)
    x = torch.randn(8, 64, device=device)
    with torch.no_grad():
        err = (te_layer(x).double() - torch_layer(x).double()).abs()
        assert (err <= tf32_matmul_bound(x, torch_layer.weight.t()) + 1e-6).all()  # + the bias add's rounding


def check_fused_wgrad_goes_to_main_grad_only(device: torch.device) -> None:
    """The weight gradient lands in main_grad and nowhere else. main_grad comes from TF32 GEMMs (TE's forward, then
    its wgrad GEMM) and the reference from IEEE fp32 ones, so they agree to a TF32 bound, elementwise: the forward's
    error doubled (d(y^2)/dy = 2y) and carried through x, plus the wgrad GEMM's own."""
    layer = make_linear(64, 128, backend="te", fuse_wgrad_accumulation=True).to(device)
    ref = nn.Linear(64, 128).to(device)
    ref.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")})
    grads = MainGrads(layer)
    x = torch.randn(8, 64, device=device)
    layer(x).square().sum().backward()
    y = ref(x)
    y.square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None
    dy = 2 * y.detach()
    bound = 2 * tf32_matmul_bound(x, ref.weight.detach().t()).t() @ x.double().abs() + tf32_matmul_bound(dy.t(), x)
    assert ((layer.weight.main_grad.double() - ref.weight.grad.double()).abs() <= bound + 1e-6).all()
    grads.to_grad()
    assert layer.weight.grad is layer.weight.main_grad


# ---- on a GPU with Transformer Engine -----------------------------------------------------------------------------


@pytest.mark.gpu
def test_fp8_model_output_is_within_fp8_tolerance_of_bf16():
    # E4M3 keeps 3 mantissa bits (relative step 2^-4 per value); over 12 blocks of sums the output's relative
    # error stays a few percent. 10% catches a wrong layout or scale, which is O(1).
    assert fp8_output_error(_te(), torch.device("cuda")) < 0.1


@pytest.mark.gpu
def test_te_linear_nn_linear_layout_round_trip():
    _te()
    check_layout_round_trip(torch.device("cuda"))


@pytest.mark.gpu
def test_fused_wgrad_goes_to_main_grad_only():
    _te()
    check_fused_wgrad_goes_to_main_grad_only(torch.device("cuda"))


@pytest.mark.gpu
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


# ---- the same bodies on the CPU stand-in --------------------------------------------------------------------------


@STAND_IN_GPUS
def test_fp8_model_output_is_within_fp8_tolerance_of_bf16_on_the_stand_in(gpu, monkeypatch):
    te_standin.install(monkeypatch, gpu)
    import transformer_engine.pytorch as te

    assert fp8_output_error(te, torch.device("cpu")) < 0.1
    assert all(layer.forwards == 1 for layer in te_standin.Linear.instances)


def test_te_linear_nn_linear_layout_round_trip_on_the_stand_in(monkeypatch):
    te_standin.install(monkeypatch)
    check_layout_round_trip(torch.device("cpu"))


def test_fused_wgrad_goes_to_main_grad_only_on_the_stand_in(monkeypatch):
    te_standin.install(monkeypatch)
    check_fused_wgrad_goes_to_main_grad_only(torch.device("cpu"))
