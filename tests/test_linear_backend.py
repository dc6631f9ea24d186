"""The layer factory: nn.Linear on CPU with one log line; te.Linear parity on a GPU with Transformer Engine."""

import logging

import pytest
import torch
from torch import nn

from models import build_model, convert_linears, linear_backend, make_linear
from models.linear import default_fp8_filter, fp8_filter, plan_conversion, te_linears
from tests import te_standin
from tests.helpers import randomize_zero_inits


def test_fp8_falls_back_to_nn_linear_on_cpu_with_one_log_line(caplog):
    model = build_model("mmDiT-debug/4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.INFO, logger="models.linear"):
        converted = convert_linears(model, precision="fp8", device="cpu")
    assert converted == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no CUDA device" in warnings[0].getMessage()
    assert not any(type(m).__module__.startswith("transformer_engine") for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bf16_precision_never_asks_for_te(caplog):
    with caplog.at_level(logging.INFO, logger="models.linear"):
        assert linear_backend("bf16", "cpu") == "torch"
    assert not caplog.records
    assert type(make_linear(4, 8)) is nn.Linear


def test_default_filter_keeps_small_layers_in_high_precision():
    model = build_model("mmDiT-S/2")
    chosen = {n for n, m in model.named_modules() if type(m) is nn.Linear and default_fp8_filter(n, m)}
    assert "blocks.0.attn.qkv" in chosen and "blocks.0.cross_attn.kv" in chosen and "blocks.3.mlp.fc2" in chosen
    assert not any(n.startswith(("t_block", "final")) or ".adaLN" in n for n in chosen)


def test_the_filter_takes_the_recipes_multiple():
    """MXFP8 needs feature sizes of 32 (tests/te_standin.py cites TE): a 48-wide layer converts only under 16."""
    layer = nn.Linear(48, 64)
    assert fp8_filter([], 16)("blocks.0.mlp.fc1", layer) and not fp8_filter([], 32)("blocks.0.mlp.fc1", layer)
    assert not fp8_filter(["mlp"], 16)("blocks.0.mlp.fc1", layer)


def test_te_linears_names_the_converted_layers(monkeypatch):
    model = build_model("mmDiT-debug/4")
    assert te_linears(model) == []
    te_standin.install(monkeypatch)
    chosen, _ = plan_conversion(model)
    assert convert_linears(model, "fp8", "cpu") == len(chosen) > 0
    assert te_linears(model) == [name for name, _ in chosen]


@pytest.mark.gpu
def test_te_linear_matches_nn_linear_and_layout_round_trips():
    pytest.importorskip("transformer_engine.pytorch", reason="Transformer Engine is not installed")
    ref = build_model("mmDiT-S/2").cuda()
    randomize_zero_inits(ref, std=0.02)
    model = build_model("mmDiT-S/2").cuda()
    model.load_state_dict(ref.state_dict())
    assert convert_linears(model, precision="fp8", device="cuda") > 0
    # Same parameter names and shapes in both layouts, and the weights come back unchanged.
    assert {k: v.shape for k, v in ref.named_parameters()} == {k: v.shape for k, v in model.named_parameters()}
    back = build_model("mmDiT-S/2").cuda()
    back.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")})
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), ref.state_dict().values(), strict=True))
    # Outside an fp8 autocast te.Linear computes in the input precision: equal up to GEMM rounding.
    x, t = torch.randn(2, 16, 32, 32, device="cuda"), torch.rand(2, device="cuda")
    text = torch.randn(2, 120, 2048, device="cuda")
    mask = torch.ones(2, 120, dtype=torch.bool, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a, b = ref(x, t, text, mask), model(x, t, text, mask)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
