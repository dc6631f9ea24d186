"""The fast path applied from outside the model (trainer/fast_path.py) and the FP8 conversion plan
(models/linear.py) on CPU: activation checkpointing changes no loss or gradient, names stay plain, the
converted-layer log line names kinds. Compile equality is a slow test here (~50 s to compile on 2 cores)."""

import copy
import logging
from contextlib import nullcontext

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from core import checkpoint
from models import ModelConfig, build_model
from models.linear import fp8_filter, layer_kinds, make_linear, plan_conversion
from tests import te_standin
from tests.helpers import randomize_zero_inits, text_inputs
from tests.model_golden import CASES, SMALL, case_inputs
from tests.stages import stage_config
from trainer.config import PrecisionSection
from trainer.fast_path import apply_compile, checkpoint_blocks, compile_choice, fp8_compile_note
from trainer.loop import train
from trainer.precision import Precision


def _model_and_inputs(dtype=torch.float64):
    model = build_model("mmDiT-debug/4").to(dtype)
    randomize_zero_inits(model, std=0.1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, 32, generator=gen, dtype=dtype)
    t = torch.rand(2, generator=gen, dtype=dtype)
    text, mask = text_inputs(model.config, 2, [5, 16])
    return model, (x, t, text.to(dtype), mask)


def _loss_and_grads(model, inputs):
    model.zero_grad(set_to_none=True)
    loss = model(*inputs).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model, inputs = _model_and_inputs()
    ref_loss, ref_grads = _loss_and_grads(model, inputs)
    names = [n for n, _ in model.named_parameters()]
    assert checkpoint_blocks(model) == model.config.depth
    assert [n for n, _ in model.named_parameters()] == names  # no wrapper prefix
    loss, grads = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    for n in names:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-10, atol=1e-12)


def test_a_deep_copy_of_a_checkpointed_model_runs_its_own_weights():
    """EMA deep-copies the model; the copy's blocks must not call back into the original's."""
    model, inputs = _model_and_inputs()
    checkpoint_blocks(model)
    twin = copy.deepcopy(model)
    assert twin.blocks[0].forward.__self__ is twin.blocks[0]
    with torch.no_grad():
        for p in twin.blocks[0].parameters():
            p.add_(0.5)
        assert not torch.allclose(twin(*inputs), model(*inputs))


def test_compile_choices():
    assert [compile_choice(v) for v in (False, None, True, "block", "model", "none")] == [
        "none", "none", "model", "block", "model", "none"]
    with pytest.raises(ValueError, match="train.compile="):
        compile_choice("blocks")
    model, _ = _model_and_inputs()
    assert apply_compile(model, False) is model


@pytest.mark.slow
def test_per_block_compile_matches_eager_and_keeps_names():
    model, inputs = _model_and_inputs(torch.float32)
    ref_loss, ref_grads = _loss_and_grads(model, inputs)
    names = [n for n, _ in model.named_parameters()]
    assert apply_compile(model, "block") is model
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == list(
        build_model("mmDiT-debug/4").state_dict())
    loss, grads = _loss_and_grads(model, inputs)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for n in names:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6)


def test_conversion_plan_names_kinds_and_follows_the_keep_list():
    model = build_model("mmDiT-S/2")
    chosen, kept = plan_conversion(model)
    summary = layer_kinds([n for n, _ in chosen])
    for kind in ("blocks.*.attn.qkv x12", "blocks.*.attn.proj x12", "blocks.*.cross_attn.q x12",
                 "blocks.*.cross_attn.kv x12", "blocks.*.mlp.fc1 x12", "blocks.*.mlp.fc2 x12"):
        assert kind in summary
    assert "final.linear x1" in layer_kinds(kept) and "t_block.fc1 x1" in layer_kinds(kept)
    # An empty keep list converts the small layers too (where their dims allow FP8 GEMMs).
    all_chosen, _ = plan_conversion(model, fp8_filter([]))
    assert {"t_block.fc2", "final.adaLN.fc2"} <= {n for n, _ in all_chosen}
    # Keeping MLPs in bf16 by name.
    no_mlp, _ = plan_conversion(model, fp8_filter(["mlp", "adaLN", "t_block", "final", "embed"]))
    assert not any(".mlp." in n for n, _ in no_mlp) and any(".attn.qkv" in n for n, _ in no_mlp)


def test_precision_reads_the_keep_list_and_fuse_flag(caplog):
    cfg = OmegaConf.merge(PrecisionSection, OmegaConf.load("configs/precision/fp8.yaml"))
    p = Precision(cfg, torch.device("cpu"))
    assert p.keep_high_precision == ("adaLN", "t_block", "final", "embed") and p.fuse_wgrad_accumulation
    with caplog.at_level(logging.INFO, logger="models.linear"):
        assert p.convert(build_model("mmDiT-debug/4")) == 0  # no CUDA: nothing converted, one warning
    assert "no CUDA device" in caplog.text
    for name in ("bf16", "fp32"):
        assert not Precision(OmegaConf.merge(PrecisionSection, OmegaConf.load(f"configs/precision/{name}.yaml")),
                             torch.device("cpu")).fp8


def test_fused_wgrad_needs_te():
    assert type(make_linear(4, 8)) is nn.Linear
    with pytest.raises(ValueError, match="backend='te'"):
        make_linear(4, 8, fuse_wgrad_accumulation=True)


# ---- every family, through the model contract's `blocks` -------------------------------------------------

FAMILY_CASES = ["ccdit/class", "mmdit/text", "jointdit/text", "pixeldit/class", "mmpixeldit/text"]
"""The five families (pixeldit on a ccDiT stream, mmpixeldit on a JointDiT one), at tests/model_golden.py's size."""


def _family_model_and_inputs(case: str, dtype: torch.dtype, **changes):
    torch.manual_seed(0)
    model = build_model(ModelConfig(**(SMALL | CASES[case] | changes))).to(dtype)
    randomize_zero_inits(model, std=0.1)
    x, t, cond = case_inputs(model.config, 16, 16)
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    return model, x.to(dtype), t.to(dtype), cond


def _family_loss_and_grads(model, x, t, cond):
    """The loss and the gradients (None where a parameter gets none: the last JointDiT block's context-query
    norm, whose queries that block does not use)."""
    model.zero_grad(set_to_none=True)
    loss = model(x, t, **cond).square().mean()
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _count_block_runs(model) -> list[int]:
    """How often each block's body has run since: every block has an `mlp`, whose forward hook fires on the
    block's forward and again on a checkpointed block's recomputation in the backward."""
    runs = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.mlp.register_forward_hook(lambda *_, i=i: runs.__setitem__(i, runs[i] + 1))
    return runs


@pytest.mark.parametrize("case", FAMILY_CASES)
def test_activation_checkpointing_recomputes_every_block_of_every_family_and_changes_nothing(case):
    model, x, t, cond = _family_model_and_inputs(case, torch.float64)
    cfg = model.config
    expected_blocks = cfg.depth + (cfg.pixel_depth if cfg.is_pixel_family else 0)
    assert len(model.blocks) == expected_blocks
    runs = _count_block_runs(model)
    ref_loss, ref_grads = _family_loss_and_grads(model, x, t, cond)
    assert runs == [1] * expected_blocks  # plain: one forward each, nothing recomputed
    names = list(model.state_dict())
    assert checkpoint_blocks(model) == expected_blocks
    assert list(model.state_dict()) == names
    runs[:] = [0] * expected_blocks
    loss, grads = _family_loss_and_grads(model, x, t, cond)
    assert runs == [2] * expected_blocks  # checkpointed: each block ran again in the backward
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in ref_grads.items() if g is None]
    for n, g in ref_grads.items():
        if g is not None:
            torch.testing.assert_close(grads[n], g, rtol=1e-10, atol=1e-12)


def test_per_block_options_need_the_contract():
    with pytest.raises(TypeError, match="DiffusionTransformer"):
        checkpoint_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("case", FAMILY_CASES)
def test_per_block_compile_of_every_family_matches_eager(case):
    # One block per stream where the family allows it: each distinct block compiles on its own.
    model, x, t, cond = _family_model_and_inputs(case, torch.float32, depth=1, pixel_depth=1)
    ref_loss, ref_grads = _family_loss_and_grads(model, x, t, cond)
    names = list(model.state_dict())
    assert apply_compile(model, "block") is model
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert list(model.state_dict()) == names
    loss, grads = _family_loss_and_grads(model, x, t, cond)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert [n for n, g in grads.items() if g is None] == [n for n, g in ref_grads.items() if g is None]
    for n, g in ref_grads.items():
        if g is not None:
            torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6)


TRAIN_CASES = {
    "ccdit": (1, ["model.family=ccdit"]),
    "mmdit": (2, ["model.family=mmdit"]),
    "jointdit": (2, ["model.family=jointdit", "+model.overrides.num_registers=2"]),
    "pixeldit": (1, ["model.family=pixeldit", "model.conditioning=class", "+model.overrides.pixel_dim=8"]),
    "mmpixeldit": (2, ["model.family=mmpixeldit", "+model.overrides.pixel_dim=8", "+model.overrides.num_registers=2"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(TRAIN_CASES))
def test_one_training_step_with_per_block_compile_and_checkpointing(family, embedded_data, tmp_path, caplog):
    """The real trainer with train.compile=block and train.activation_checkpointing=true, for every family:
    both act on every block the contract names, and the checkpoint keeps the plain parameter names."""
    stage, overrides = TRAIN_CASES[family]
    cfg = stage_config(stage, embedded_data, tmp_path, *overrides, "model.patch=4", "train.init_from=null",
                       "train.max_steps=1", "train.compile=block", "train.activation_checkpointing=true")
    with caplog.at_level(logging.INFO, logger="trainer.fast_path"):
        summary = train(cfg)
    state = checkpoint.load(summary["checkpoint"])
    model_cfg = state["metadata"]["model"]
    blocks = model_cfg["depth"] + (model_cfg["pixel_depth"] if family.endswith("pixeldit") else 0)
    assert f"activation checkpointing on {blocks} blocks" in caplog.text
    assert f"torch.compile per block ({blocks} blocks)" in caplog.text
    assert summary["steps"] == 1 and torch.isfinite(torch.tensor(summary["first_loss"]))
    assert list(state["model"]) == list(build_model(ModelConfig(**model_cfg)).state_dict())


# ---- with Transformer Engine layers (tests/te_standin.py) ---------------------------------------------------

FP8_CASE = dict(family="mmdit", conditioning="text", dim=64, depth=2, heads=2, cond_dim=32, patch=4, input_size=16,
                in_channels=3, text_dim=32, text_len=12, text_pad_multiple=32)
"""A model every recipe converts at batch 2: 16 image tokens and 32 padded caption keys a sample, features of 32."""


def _fp8_model(recipe: str, monkeypatch):
    """FP8_CASE with its large linears converted to the stand-in's te.Linear, and the Precision that runs it."""
    te_standin.install(monkeypatch, (10, 0) if recipe == "mxfp8" else (9, 0))
    precision = Precision(OmegaConf.structured(PrecisionSection(compute="fp32", fp8=True, fp8_recipe=recipe)),
                          torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(ModelConfig(**FP8_CASE))
    randomize_zero_inits(model, std=0.1)
    assert precision.convert(model) == 14  # self- and cross-attention projections and the MLP of both blocks
    return model, precision


def _fp8_inputs():
    gen = torch.Generator().manual_seed(5)
    cfg = ModelConfig(**FP8_CASE)
    text, mask = text_inputs(cfg, 2, [12, 7])
    return torch.randn(2, 3, 16, 16, generator=gen), torch.rand(2, generator=gen), text, mask


@pytest.mark.parametrize("recipe", ["current", "delayed", "mxfp8"])
def test_fp8_activation_checkpointing_recomputes_inside_the_forward_recipe(recipe, monkeypatch, caplog):
    """te.Linear reads TE's global FP8 state at every forward, and the trainer's backward runs after the FP8 autocast
    has closed: a block recomputed by torch's checkpoint would take te.Linear's high-precision path, save other
    tensors than its forward did, and torch would stop the backward with a CheckpointError. Blocks holding te.Linear
    layers go through TE's checkpoint instead, whose recompute re-enters the forward's recipe (and, under delayed
    scaling, the forward's scales, which the autocast's exit has moved on): every gradient equals the FP8 run's
    without checkpointing, over two steps."""
    plain, precision = _fp8_model(recipe, monkeypatch)
    checkpointed = copy.deepcopy(plain)
    with caplog.at_level(logging.INFO, logger="trainer.fast_path"):
        assert checkpoint_blocks(checkpointed) == 2
    inputs = _fp8_inputs()
    for _ in range(2):
        grads = []
        for model in (plain, checkpointed):
            model.zero_grad(set_to_none=True)
            with precision.forward():
                loss = model(*inputs).square().mean()
            loss.backward()  # outside the autocast, as trainer/loop.py runs it
            grads.append({n: p.grad for n, p in model.named_parameters()})
        for name, grad in grads[0].items():
            torch.testing.assert_close(grads[1][name], grad, rtol=1e-6, atol=1e-8, msg=name)
    assert "2 through Transformer Engine's checkpoint" in caplog.text


def test_fp8_training_with_activation_checkpointing(embedded_data, tmp_path, monkeypatch, caplog):
    """The trainer with precision=fp8 and train.activation_checkpointing=true (the planner's usual advice)."""
    te_standin.install(monkeypatch)
    with caplog.at_level(logging.INFO):
        summary = train(stage_config(1, embedded_data, tmp_path, "precision=fp8", "device=cpu", "train.batch_size=8",
                                     "train.max_steps=2", "train.activation_checkpointing=true"))
    assert summary["steps"] == 2 and any(layer.forwards for layer in te_standin.Linear.instances)
    assert "activation checkpointing on 2 blocks (2 through Transformer Engine's checkpoint" in caplog.text


def _traced(model, inputs, context) -> tuple[list[str], list[str], int]:
    """What torch.compile's dynamo captures of one forward: (the ops it traced, the parameters its graphs read, the
    graph breaks)."""
    torch._dynamo.reset()
    with context:
        explained = torch._dynamo.explain(model)(*inputs)
    nodes = [n for graph in explained.graphs for n in graph.graph.nodes]
    weights = [n.name for n in nodes if n.op == "placeholder" and n.name.endswith("_weight_")]
    return [str(n.target) for n in nodes if n.op == "call_function"], weights, explained.graph_break_count


CONVERTED = ("_attn_modules_qkv_", "_attn_modules_proj_", "_cross_attn_modules_q_", "_cross_attn_modules_kv_",
             "_mlp_modules_fc1_", "_mlp_modules_fc2_")


def test_torch_compile_cuts_the_graph_at_every_te_linear(monkeypatch):
    """TE marks te.Linear's forward no_torch_dynamo: dynamo traces nothing of a te.Linear, and a model's graph is cut
    at each, so its graphs hold the rest of the blocks (attention, norms) but no converted layer, where the same model
    with nn.Linear traces every projection in fewer pieces. TE's checkpoint is not traced either: of a model whose
    blocks it checkpoints, nothing inside a block is."""
    model, precision = _fp8_model("current", monkeypatch)
    inputs = _fp8_inputs()
    torch._dynamo.reset()
    with precision.forward():
        assert torch._dynamo.explain(model.blocks[0].attn.qkv)(torch.randn(32, 64)).graph_count == 0
    assert torch._dynamo.explain(nn.Linear(64, 192))(torch.randn(32, 64)).graph_count == 1
    plain_ops, plain_weights, plain_breaks = _traced(build_model(ModelConfig(**FP8_CASE)), inputs, nullcontext())
    ops, weights, breaks = _traced(model, inputs, precision.forward())
    assert all(any(kind in w for w in plain_weights) for kind in CONVERTED)
    assert not any(kind in w for w in weights for kind in CONVERTED)
    assert any("scaled_dot_product_attention" in op for op in ops) and breaks > plain_breaks
    checkpoint_blocks(model)
    ops, _, _ = _traced(model, inputs, precision.forward())
    assert not any("scaled_dot_product_attention" in op for op in ops)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compile_with_fp8_says_what_it_compiles(checkpointing, monkeypatch, caplog):
    model, _ = _fp8_model("current", monkeypatch)
    if checkpointing:
        checkpoint_blocks(model)
    with caplog.at_level(logging.WARNING, logger="trainer.fast_path"):
        apply_compile(model, "block")
    expected = "those blocks run eagerly" if checkpointing else "each block's graph is cut at every te.Linear"
    assert expected in caplog.text and "train.compile=block with FP8" in caplog.text
    assert fp8_compile_note(False, checkpointing) is None


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_memory_plan_says_what_compile_does_with_fp8(checkpointing):
    from planner.plan import compose, make_plan

    small = ["model.size=debug", "model.patch=4", "data.image_size=32", "vae=identity", "precision=fp8",
             "precision.compute=bf16", "train.compile=block", f"train.activation_checkpointing={checkpointing}"]
    report = make_plan(compose(1, small), 1).report()
    setting = report.split("Planner: activation checkpointing ")[1].split(" ")[0] == "on"
    assert fp8_compile_note("block", setting) in report
    assert "train.compile=block with FP8" not in make_plan(compose(1, small), 1, te_available=False).report()
    assert "train.compile" not in make_plan(compose(1, [*small[:-2], "train.compile=false"]), 1).report().split(
        "Overrides:")[1].split("Not counted")[0]
