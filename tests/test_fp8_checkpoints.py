"""FP8-trained checkpoints go everywhere a bf16 one goes, and FP8 runs meet TE's shape rule at any batch size.

The trainer converts to tests/te_standin.py's te.Linear stand-in (TE's state-dict `_extra_state`, its shape rule
and its fused-wgrad contract, on the CPU). A checkpoint of such a run keeps `model` and `ema` in the plain
nn.Linear layout and the scaling state beside them (trainer/checkpoint.py); every consumer must load it with no
manual step, and a resume into FP8 must get the scaling state back."""

import subprocess
import sys

import pytest
import torch

from app.pipeline import load_pipeline
from reparameterize import main as reparameterize_main
from tests import te_standin
from tests.stages import ROOT, stage_config
from trainer import checkpoint
from trainer.loop import train

FP8 = ("precision=fp8", "device=cpu")


def _stand_ins_ran() -> bool:
    return any(layer.calls for layer in te_standin.StandInTELinear.instances)


@pytest.fixture
def fp8_stage1(embedded_data, tmp_path, monkeypatch):
    """Stage 1 with FP8 layers at micro-batch 10 (not a multiple of 16): 3 steps."""
    te_standin.install(monkeypatch)
    out = tmp_path / "fp8-stage1"
    summary = train(stage_config(1, embedded_data, out, *FP8, "train.batch_size=10", "train.max_steps=3"))
    assert _stand_ins_ran()
    return out, checkpoint.load(summary["checkpoint"]), summary


def test_fp8_checkpoint_is_saved_in_the_plain_layout_with_the_scaling_state_beside_it(fp8_stage1):
    _, state, _ = fp8_stage1
    for key in ("model", "ema"):
        assert not [k for k in state[key] if k.endswith("_extra_state")], key
        extra = state["te_extra_state"][key]
        assert extra and all(k.endswith("._extra_state") for k in extra)
    assert state["metadata"]["linear_layout"] == "torch" and state["metadata"]["trained_linear_layout"] == "te"
    # A plain model takes the weights as they are (strict).
    plain, _ = checkpoint.load_model(fp8_stage1[2]["checkpoint"])
    assert sum(p.numel() for p in plain.parameters()) == sum(v.numel() for v in state["ema"].values())


@pytest.mark.slow
def test_resume_into_fp8_restores_the_scaling_state_and_into_bf16_just_loads(fp8_stage1, embedded_data, monkeypatch):
    out, state, _ = fp8_stage1
    saved_calls = {k: bytes(v.tolist()) for k, v in state["te_extra_state"]["model"].items()}
    te_standin.StandInTELinear.instances = []
    train(stage_config(1, embedded_data, out, *FP8, "train.batch_size=10", "train.max_steps=4"))
    resumed = checkpoint.load(checkpoint.list_checkpoints(out / "checkpoints")[-1])
    assert resumed["step"] == 4
    # Every layer's forward count went on from the saved one (restored), instead of restarting at zero.
    import json

    for key, raw in saved_calls.items():
        before = json.loads(raw)["calls"]
        after = json.loads(bytes(resumed["te_extra_state"]["model"][key].tolist()))["calls"]
        assert after > before > 0, key
    # The same run resumed in bf16 (no TE layers): loads, trains a step, and writes no scaling state.
    monkeypatch.undo()
    plain = train(stage_config(1, embedded_data, out, "precision=bf16", "device=cpu", "train.batch_size=10",
                               "train.max_steps=5"))
    final = checkpoint.load(plain["checkpoint"])
    assert final["step"] == 5 and "te_extra_state" not in final


@pytest.mark.slow
def test_every_consumer_takes_an_fp8_checkpoint(fp8_stage1, embedded_data, tmp_path, monkeypatch):
    out, _, summary = fp8_stage1
    monkeypatch.undo()  # the consumers run without TE
    ckpt = summary["checkpoint"]
    # The sampler's pipeline (app/sample.py, the Gradio app and the evaluation all load through it).
    pipe = load_pipeline(ckpt, device="cpu")
    images = pipe.generate(labels=[0, 1], seeds=[0, 1], steps=2)
    assert images.shape == (2, 32, 32, 3)
    proc = subprocess.run([sys.executable, "app/sample.py", "--model-path", ckpt, "--class-label", "0", "--steps", "2",
                           "--out-dir", str(tmp_path / "samples")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # reparameterize.py, and the next stage through train.init_from.
    init = tmp_path / "init.pt"
    assert reparameterize_main(["stage1-to-stage2", "--src", ckpt, "--dst", str(init), "--text-dim", "384",
                                "--text-len", "32"]) in (0, None)
    stage2 = train(stage_config(2, embedded_data, tmp_path / "s2", "device=cpu", f"train.init_from={init}",
                                "train.max_steps=1"))
    assert stage2["steps"] == 1
    again = train(stage_config(1, embedded_data, tmp_path / "s1-again", "device=cpu", f"train.init_from={out}",
                               "train.max_steps=1"))
    assert again["steps"] == 1


@pytest.mark.slow
def test_a_checkpoint_with_inline_extra_state_still_loads(fp8_stage1, embedded_data, tmp_path):
    """Older FP8 runs (and `reparameterize.py to-te`) kept `_extra_state` inside `model` / `ema`."""
    _, state, _ = fp8_stage1
    legacy = dict(state)
    for key in ("model", "ema"):
        legacy[key] = dict(state[key]) | state["te_extra_state"][key]
    del legacy["te_extra_state"]
    path = tmp_path / "legacy" / "checkpoints" / "step_00000003.pt"
    checkpoint.save_atomic(legacy, path)
    assert load_pipeline(path, device="cpu").generate(labels=[0], seeds=[0], steps=1).shape == (1, 32, 32, 3)
    resumed = train(stage_config(1, embedded_data, tmp_path / "legacy", "device=cpu", "train.batch_size=10",
                                 "train.max_steps=4"))
    assert resumed["steps"] == 4
    init = train(stage_config(1, embedded_data, tmp_path / "from-legacy", "device=cpu", f"train.init_from={path}",
                              "train.max_steps=1"))
    assert init["steps"] == 1


@pytest.mark.slow
def test_text_stage_at_micro_batch_10_meets_the_shape_rule(embedded_data, tmp_path, monkeypatch, caplog):
    """Cross-attention keys are batch x (captions + null token) rows, 10 x 33 here: an FP8 run pads the caption
    keys to a multiple of 16 (masked), so the key/value projection converts too, and every converted layer runs
    through the stand-in's shape check at micro-batch 10. Without the padding that layer stays bf16, logged."""
    te_standin.install(monkeypatch)
    with caplog.at_level("INFO"):
        summary = train(stage_config(2, embedded_data, tmp_path, *FP8, "train.init_from=null", "train.batch_size=10",
                                     "train.max_steps=2"))
    assert summary["steps"] == 2 and _stand_ins_ran()
    assert checkpoint.load(summary["checkpoint"])["metadata"]["model"]["text_pad_multiple"] == 16
    assert "blocks.*.cross_attn.kv x2" in caplog.text.split("kept in bf16:")[0]  # converted
    assert "shape rule" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        train(stage_config(2, embedded_data, tmp_path / "unpadded", *FP8, "train.init_from=null",
                           "train.batch_size=10", "train.max_steps=1", "+model.overrides.text_pad_multiple=1"))
    assert "kept in bf16 for TE's shape rule" in caplog.text and "blocks.*.cross_attn.kv x2" in caplog.text


def test_the_stand_in_enforces_the_rule():
    layer = te_standin.StandInTELinear(32, 32)
    layer(torch.zeros(16, 32))
    with pytest.raises(te_standin.ShapeRuleError, match="rows 10"):
        layer(torch.zeros(10, 32))
    with pytest.raises(te_standin.ShapeRuleError, match="feature sizes"):
        te_standin.StandInTELinear(32, 24)
