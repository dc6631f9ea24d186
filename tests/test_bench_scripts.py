"""The benchmark scripts run (--smoke: tiny model, 2 steps, CPU), including the diffusers side, so they do not
rot between GPU runs; their figures are not checked. And the analytic FLOP count against torch's counter."""

import os
import subprocess
import sys

import pytest
import torch

from tests.stages import ROOT


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "sample"])
def test_bench_script_smoke(script):
    proc = subprocess.run([sys.executable, "-m", f"scripts.bench.{script}", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    modes = {line.split("|")[1].strip() for line in table[1:]}
    assert {"diffusers", "eager" if script == "train" else "ours"} <= modes
    for line in table[1:]:
        if "skipped" not in line:
            assert "n/a | n/a | n/a" not in line, line  # a measured row has its figures


@pytest.mark.slow
def test_fp8_parity_script_smoke(embedded_data, tmp_path):
    """A smoke test of scripts/bench/fp8_parity.py, not of FP8 parity: on a CPU both arms fall back to fp32 nn.Linear
    (the fp8 arm logs why), so the script runs the trainer twice, compares the two runs and reports a 0.00% difference.
    FP8 against bf16 is measured on a GPU (tests/test_gpu_fp8.py)."""
    proc = subprocess.run([sys.executable, "-m", "scripts.bench.fp8_parity", "--smoke", "--data-dir",
                           str(embedded_data), "--out-dir", str(tmp_path), "train.num_threads=1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "relative difference 0.00%" in proc.stdout, proc.stdout
    assert (tmp_path / "bf16" / "summary.json").exists() and (tmp_path / "fp8" / "summary.json").exists()


def test_analytic_flops_match_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    from models import build_model
    from scripts.bench.common import mmdit_forward_flops

    model = build_model("mmDiT-debug/4", input_size=16)
    cfg = model.config
    x, t = torch.randn(2, cfg.in_channels, 16, 16), torch.rand(2)
    text, mask = torch.randn(2, cfg.text_len, cfg.text_dim), torch.ones(2, cfg.text_len, dtype=torch.bool)
    with FlopCounterMode(display=False) as counter:
        model(x, t, text, mask)
    tokens = (16 // cfg.patch) ** 2
    ours = 2 * mmdit_forward_flops(cfg.dim, cfg.depth, tokens, cfg.text_len + 1, cfg.text_dim, cfg.in_channels,
                                   cfg.patch, cfg.mlp_ratio, cfg.cond_dim)
    # torch counts matmuls and convs; it has no formula for the CPU flash-attention kernel SDPA takes here, so
    # the two attention products per attention (scores and weights x V) are taken out of the analytic count.
    length = cfg.text_len + 1
    attention = 2 * cfg.depth * (2 * 2 * tokens * tokens * cfg.dim + 2 * 2 * tokens * length * cfg.dim)
    assert ours - attention == pytest.approx(counter.get_total_flops(), rel=1e-9)
