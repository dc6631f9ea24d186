"""The compiled fast path on a GPU (`pytest -m gpu`): a short per-block compiled training run matches eager,
and CUDA-graph sampling matches eager sampling (its bf16 case also runs eagerly on the CPU, not marked `gpu`).
FP8 vs bf16 loss parity over 500 steps is scripts/bench/fp8_parity.py (minutes of GPU time, not a unit test)."""

import pytest
import torch

from flow import sample
from models import build_model
from tests.helpers import randomize_zero_inits
from trainer.fast_path import apply_compile, checkpoint_blocks
from trainer.optim import build_optimizer


def _losses(compile_how, checkpointing: bool, steps: int = 5) -> list[float]:
    torch.manual_seed(0)
    model = build_model("mmDiT-S/2").cuda()
    if checkpointing:
        checkpoint_blocks(model)
    forward = apply_compile(model, compile_how)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x1 = torch.randn(8, 16, 32, 32, device="cuda", generator=gen)
    text = torch.randn(8, 120, 2048, device="cuda", generator=gen)
    mask = torch.ones(8, 120, dtype=torch.bool, device="cuda")
    losses = []
    for _ in range(steps):
        x0 = torch.randn(x1.shape, device="cuda", generator=gen)
        t = torch.rand(8, device="cuda", generator=gen)
        tt = t[:, None, None, None]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            v = forward(tt * x1 + (1 - tt) * x0, t, text, mask)
        loss = (v.float() - (x1 - x0)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_compiled_training_matches_eager_loss():
    eager = _losses("none", False)
    # bf16 kernels differ between inductor's fusions and eager: agreement to bf16 rounding, not bitwise.
    assert _losses("block", False) == pytest.approx(eager, rel=2e-2)
    assert _losses("block", True) == pytest.approx(eager, rel=2e-2)


def bf16_sampling_case(device: str):
    """mmDiT-S/2 in bf16 (what `sample(model_dtype=torch.bfloat16)` feeds it: bf16 inputs need bf16 weights) with a
    caption and the null caption, at batch 2."""
    model = build_model("mmDiT-S/2").to(device).eval()
    randomize_zero_inits(model, std=0.02)
    model.to(torch.bfloat16)
    x0 = torch.randn(2, 16, 32, 32, device=device)
    cond = dict(text=torch.randn(2, 120, 2048, device=device), text_mask=torch.ones(2, 120, dtype=torch.bool,
                                                                                   device=device))
    uncond = dict(text=torch.zeros(1, 120, 2048, device=device), text_mask=torch.zeros(1, 120, dtype=torch.bool,
                                                                                      device=device))
    return model, x0, cond, uncond


@pytest.mark.gpu
def test_cuda_graph_sampling_matches_eager():
    model, x0, cond, uncond = bf16_sampling_case("cuda")
    kw = dict(steps=8, cfg_scale=4.0, model_dtype=torch.bfloat16)
    eager = sample(model, x0, cond, uncond, **kw)
    graphed = sample(model, x0, cond, uncond, cuda_graphs=True, **kw)
    again = sample(model, x0, cond, uncond, cuda_graphs=True, **kw)  # replays, after the first capture
    torch.testing.assert_close(graphed, eager, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(again, graphed, rtol=1e-5, atol=1e-5)


def test_the_bf16_sampling_case_runs_on_cpu():
    """The GPU test's case, eager, on the CPU: the bf16 sample stays within bf16 rounding of the same weights in fp32
    (two steps; each step's velocity carries bf16's 2^-8 relative rounding through 12 blocks)."""
    model, x0, cond, uncond = bf16_sampling_case("cpu")
    bf16 = sample(model, x0, cond, uncond, steps=2, cfg_scale=4.0, model_dtype=torch.bfloat16)
    fp32 = sample(model.float(), x0, cond, uncond, steps=2, cfg_scale=4.0)
    assert bf16.dtype == torch.float32
    assert ((bf16 - fp32).norm() / fp32.norm()).item() < 5e-2
