"""FP8-trained checkpoints go everywhere a bf16 one goes, FP8 runs meet TE's shape rule at any batch size and in
every bucket, per recipe, and a delayed-scaling run resumes.

The trainer converts to tests/te_standin.py's te.Linear stand-in, installed as `transformer_engine.pytorch` (TE's
global FP8 state, its per-recipe shape rule, its extra state and its refusal to unpickle delayed-scaling state,
fused wgrad into main_grad; the docstring cites TE's source for each). A checkpoint of such a run keeps `model` and
`ema` in the plain nn.Linear layout and the scaling state beside them (trainer/state.py); every consumer must
load it with no manual step."""

import logging
import re
import subprocess
import sys

import pytest
import torch

from app.pipeline import load_pipeline
from core import checkpoint
from reparameterize import main as reparameterize_main
from tests import te_standin
from tests.stages import ROOT, stage_config
from trainer.loop import train
from trainer.precision import FP8_MULTIPLE, fp8_recipe_name, loadable_extra_state, text_pad_multiple

FP8 = ("precision=fp8", "device=cpu")
HOPPER, BLACKWELL = (9, 0), (10, 0)


def _stand_ins_ran() -> bool:
    return any(layer.forwards for layer in te_standin.Linear.instances)


def _conversion(log: str) -> tuple[str, str]:
    """(converted, kept) of models/linear.py's conversion log line."""
    found = re.search(r"converted \d+/\d+ linear layers to te.Linear \([^)]*\): (.*); kept in bf16: (.*)", log)
    assert found, log[-2000:]
    return found.group(1), found.group(2)


@pytest.fixture
def fp8_stage1(embedded_data, tmp_path, monkeypatch):
    """Stage 1 with FP8 layers (auto on Hopper: current scaling) at micro-batch 10 (not a multiple of 16): 3 steps."""
    te_standin.install(monkeypatch, HOPPER)
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
    # Current scaling is stateless: TE (>= 2.18) saves an empty extra state for it.
    assert all(v.numel() == 0 for v in state["te_extra_state"]["model"].values())
    assert state["metadata"]["linear_layout"] == "torch" and state["metadata"]["trained_linear_layout"] == "te"
    # A plain model takes the weights as they are (strict).
    plain, _ = checkpoint.load_model(fp8_stage1[2]["checkpoint"])
    assert sum(p.numel() for p in plain.parameters()) == sum(v.numel() for v in state["ema"].values())


DELAYED = (*FP8, "precision.fp8_recipe=delayed", "train.batch_size=10")


def _forwards(state) -> dict[str, int]:
    return {k: te_standin.saved_forwards(v) for k, v in state["te_extra_state"]["model"].items()}


@pytest.mark.slow
def test_a_delayed_scaling_run_resumes_without_unpickling_unless_the_user_opts_in(embedded_data, tmp_path,
                                                                                 monkeypatch, caplog):
    """TE >= 2.18 refuses to unpickle delayed scaling's extra state unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1.
    A resume drops it with one log line (the amax history restarts); with the variable set it is restored."""
    te_standin.install(monkeypatch, HOPPER)
    monkeypatch.delenv(te_standin.UNSAFE_PICKLE_ENV, raising=False)
    out = tmp_path / "delayed"
    first = checkpoint.load(train(stage_config(1, embedded_data, out, *DELAYED, "train.max_steps=3"))["checkpoint"])
    saved = _forwards(first)
    assert saved and all(n > 0 for n in saved.values())  # a pickled, non-empty state per layer
    pickled = sum(bool(v.numel()) for part in first["te_extra_state"].values() for v in part.values())
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        dropped = train(stage_config(1, embedded_data, out, *DELAYED, "train.max_steps=4"))
    assert dropped["steps"] == 4
    assert f"dropped the FP8 delayed-scaling state (amax history and scales) of {pickled} te.Linear" in caplog.text
    assert "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1" in caplog.text
    after = _forwards(checkpoint.load(dropped["checkpoint"]))
    assert all(0 < after[k] < n for k, n in saved.items())  # started afresh at the resume
    # Opted in: TE unpickles it, and every layer's state goes on from the saved one.
    monkeypatch.setenv(te_standin.UNSAFE_PICKLE_ENV, "1")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        restored = train(stage_config(1, embedded_data, tmp_path / "delayed-again", *DELAYED, "train.max_steps=4",
                                      f"train.resume={checkpoint.list_checkpoints(out / 'checkpoints')[0]}"))
    assert "dropped" not in caplog.text
    again = _forwards(checkpoint.load(restored["checkpoint"]))
    assert all(again[k] > n for k, n in saved.items())


@pytest.mark.slow
def test_a_sharded_delayed_scaling_checkpoint_resumes_without_unpickling(embedded_data, tmp_path, monkeypatch,
                                                                         caplog):
    """The same for a step_N.dcp folder (train.parallel=fsdp, one process): its meta.pt carries the pickled states."""
    te_standin.install(monkeypatch, HOPPER)
    monkeypatch.delenv(te_standin.UNSAFE_PICKLE_ENV, raising=False)
    args = (*DELAYED, "precision.fuse_wgrad_accumulation=false", "train.parallel=fsdp", "train.eval_batches=0")
    train(stage_config(1, embedded_data, tmp_path, *args, "train.max_steps=2"))
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        assert train(stage_config(1, embedded_data, tmp_path, *args, "train.max_steps=3"))["steps"] == 3
    assert "dropped the FP8 delayed-scaling state" in caplog.text


def test_loadable_extra_state_keeps_empty_states_and_replaces_pickled_ones(monkeypatch, caplog):
    pickled, empty = torch.arange(5, dtype=torch.uint8), torch.empty(0, dtype=torch.uint8)
    extra = dict(model={"a._extra_state": pickled, "b._extra_state": empty}, ema={"a._extra_state": pickled})
    monkeypatch.delenv(te_standin.UNSAFE_PICKLE_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="trainer.precision"):
        kept = loadable_extra_state(extra, "ckpt.pt")
    assert {k: list(v) for k, v in kept.items()} == {k: list(v) for k, v in extra.items()}
    assert all(v.numel() == 0 for part in kept.values() for v in part.values())
    assert "ckpt.pt: dropped the FP8 delayed-scaling state (amax history and scales) of 2 te.Linear" in caplog.text
    monkeypatch.setenv(te_standin.UNSAFE_PICKLE_ENV, "1")
    assert loadable_extra_state(extra, "ckpt.pt") is extra


def test_resume_into_bf16_just_loads(fp8_stage1, embedded_data, monkeypatch):
    out, _, _ = fp8_stage1
    monkeypatch.undo()  # no TE layers
    plain = train(stage_config(1, embedded_data, out, "precision=bf16", "device=cpu", "train.batch_size=10",
                               "train.max_steps=4"))
    final = checkpoint.load(plain["checkpoint"])
    assert final["step"] == 4 and "te_extra_state" not in final


@pytest.mark.slow
def test_every_consumer_takes_an_fp8_checkpoint(fp8_stage1, embedded_data, tmp_path, monkeypatch):
    out, _, summary = fp8_stage1
    monkeypatch.undo()  # the consumers run without TE
    ckpt = summary["checkpoint"]
    # The sampler's pipeline (app/sample.py, the Gradio app and the evaluation all load through it).
    pipe = load_pipeline(ckpt, device="cpu")
    images = pipe.generate(labels=[0, 1], seeds=[0, 1], steps=2)
    assert images.shape == (2, 32, 32, 3)
    proc = subprocess.run([sys.executable, "-m", "app.sample", "--model-path", ckpt, "--class-label", "0", "--steps",
                           "2", "--out-dir", str(tmp_path / "samples")], cwd=ROOT, capture_output=True, text=True,
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


# ---- TE's shape rule, per recipe and per bucket ------------------------------------------------------------------


def test_the_recipes_multiples_and_caption_padding():
    """16 for per-tensor scaling, 32 for MXFP8 (tests/te_standin.py cites TE for both); `auto` resolves by the GPU,
    and pads captions for the larger, since the model config is fixed before the GPU is known."""
    assert FP8_MULTIPLE == {"current": 16, "delayed": 16, "mxfp8": 32}
    assert [text_pad_multiple(n) for n in ("current", "delayed", "mxfp8", "auto")] == [16, 16, 32, 32]
    with pytest.raises(ValueError, match="precision.fp8_recipe='e5m2'"):
        text_pad_multiple("e5m2")


def test_a_misspelt_recipe_stops_a_run_before_it_starts():
    """precision.fp8_recipe is checked at the door with every other key (trainer/config.py RANGES), fp8 on or off, by
    the rule text_pad_multiple applies: TE's recipes are MXFP8 block, current and delayed scaling (and auto)."""
    from omegaconf import OmegaConf

    from trainer.config import RunConfig, check_ranges
    from trainer.errors import ConfigError

    cfg = OmegaConf.structured(RunConfig)
    cfg.stage = 1
    for fp8 in (False, True):
        cfg.precision.fp8, cfg.precision.fp8_recipe = fp8, "e5m2"
        with pytest.raises(ConfigError, match=re.escape("precision.fp8_recipe='e5m2': expected auto, mxfp8, current")):
            check_ranges(cfg)
    for name in ("auto", "mxfp8", "current", "delayed"):
        cfg.precision.fp8_recipe = name
        check_ranges(cfg)


def test_auto_picks_mxfp8_on_blackwell_and_current_scaling_on_hopper(monkeypatch):
    for capability, name in ((HOPPER, "current"), ((8, 9), "current"), (BLACKWELL, "mxfp8"), ((12, 0), "mxfp8")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert fp8_recipe_name("auto", torch.device("cuda")) == name
    assert fp8_recipe_name("delayed", torch.device("cuda")) == "delayed"


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [HOPPER, BLACKWELL], ids=["hopper-current", "blackwell-mxfp8"])
def test_text_stage_at_an_odd_micro_batch_meets_the_recipes_rule(gpu, embedded_data, tmp_path, monkeypatch, caplog):
    """Cross-attention keys are batch x (captions + null token) rows, 9 x 33 here: an FP8 run pads the caption keys
    to the recipe's multiple (masked: 48 rows on Hopper, 64 under MXFP8, whose blocks are 32), so the key/value
    projection converts too, and every converted layer runs through the stand-in's shape check at micro-batch 9.
    Without the padding that layer stays bf16, logged."""
    te_standin.install(monkeypatch, gpu)
    with caplog.at_level("INFO"):
        summary = train(stage_config(2, embedded_data, tmp_path, *FP8, "train.init_from=null", "train.batch_size=9",
                                     "train.max_steps=2"))
    assert summary["steps"] == 2 and _stand_ins_ran()
    assert checkpoint.load(summary["checkpoint"])["metadata"]["model"]["text_pad_multiple"] == 32  # auto
    assert "blocks.*.cross_attn.kv x2" in _conversion(caplog.text)[0]
    assert "shape rule" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        train(stage_config(2, embedded_data, tmp_path / "unpadded", *FP8, "train.init_from=null",
                           "train.batch_size=9", "train.max_steps=1", "+model.overrides.text_pad_multiple=1"))
    assert "kept in bf16 for TE's shape rule" in caplog.text and "blocks.*.cross_attn.kv x2" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("gpu", [HOPPER, BLACKWELL], ids=["hopper-current", "blackwell-mxfp8"])
def test_every_bucket_meets_the_rule(gpu, embedded_data, tmp_path, monkeypatch, caplog):
    """Stage 5's buckets are 48x48 (64 tokens a sample at patch 6) and 42x54 / 54x42 (63): the square passes the
    rule at every recipe's multiple (6 x 64 = 384 rows), the others do not (6 x 63 = 378 rows: not a multiple of 8,
    so even the forward would fail). The image-token layers must stay bf16, decided from every bucket; the
    caption-key projection (padded) converts."""
    te_standin.install(monkeypatch, gpu)
    with caplog.at_level("INFO"):
        summary = train(stage_config(5, embedded_data, tmp_path, *FP8, "train.init_from=null", "train.batch_size=6",
                                     "data.buckets=[42x54]", "train.max_steps=2", "train.eval_batches=0"))
    assert summary["steps"] == 2 and _stand_ins_ran()
    kept = caplog.text.split("kept in bf16 for TE's shape rule")[1].splitlines()[0]
    multiple = FP8_MULTIPLE[fp8_recipe_name("auto", torch.device("cuda"))]
    assert f"not a multiple of {multiple} at [" in kept and all(f"'{size}'" in kept for size in ("48x48", "42x54",
                                                                                                   "54x42"))
    for kind in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "cross_attn.q "):
        assert f"blocks.*.{kind}" in kept + " ", kind
    assert "blocks.*.cross_attn.kv x2" in _conversion(caplog.text)[0]


@pytest.mark.parametrize("recipe", ["current", "delayed", "mxfp8"])
def test_the_stand_in_enforces_the_recipes_rule(recipe, monkeypatch):
    """The stand-in itself, against the multiples its docstring cites from TE: only inside the FP8 autocast, the
    forward's (rows % 8, features % 16; MXFP8 32 and 32) and, per-tensor on Hopper, the backward's rows % 16."""
    te_standin.install(monkeypatch)
    import transformer_engine.pytorch as te
    from transformer_engine.common import recipe as recipes

    r = dict(current=recipes.Float8CurrentScaling(), delayed=recipes.DelayedScaling(),
             mxfp8=recipes.MXFP8BlockScaling())[recipe]
    layer = te.Linear(32, 32)
    layer(torch.zeros(10, 32))  # outside the autocast: any shape
    te.Linear(24, 32)  # TE checks nothing at construction
    with te.fp8_autocast(fp8_recipe=r):
        layer(torch.zeros(32, 32)).sum().backward()
        with pytest.raises(te_standin.ShapeRuleError, match="got 10 x 32"):
            layer(torch.zeros(10, 32))
        with pytest.raises(te_standin.ShapeRuleError, match="got 32 x 24"):
            te.Linear(24, 32)(torch.zeros(32, 24))
        if recipe == "mxfp8":
            with pytest.raises(te_standin.ShapeRuleError, match="got 24 x 32"):
                layer(torch.zeros(24, 32))
            return
        y = layer(torch.zeros(24, 32, requires_grad=True))  # rows % 8: the forward runs
    with pytest.raises(te_standin.ShapeRuleError, match="wgrad/dgrad GEMM"):
        y.sum().backward()
