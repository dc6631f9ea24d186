"""Sampling in bfloat16 on CUDA (app/precision.py, app/pipeline.py): the dtype each front end picks, the flag that
keeps float32, and bf16 sampling through the pipeline's own path within bf16's precision of float32.

No GPU here: `fake_cuda` is a TorchFunctionMode that runs whatever asks for a CUDA device on the CPU (a factory's
device=, a tensor's or module's .to), so load_pipeline(device="cuda") takes its CUDA branch, on the CPU, whose
bf16 kernels compute the same dtype of arithmetic."""

import argparse

import pytest
import torch
from torch.overrides import TorchFunctionMode

from app.pipeline import load_pipeline
from app.precision import inference_dtype
from core import checkpoint
from tests.helpers import randomize_zero_inits


def _on_cpu(value):
    if isinstance(value, str) and value.startswith("cuda"):
        return "cpu"
    if isinstance(value, torch.device) and value.type == "cuda":
        return torch.device("cpu")
    return value


class CudaOnCpu(TorchFunctionMode):
    """Every CUDA device named in a torch call becomes the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.device:  # a device may be named cuda; what runs there runs on the CPU
            return func(*args, **(kwargs or {}))
        return func(*[_on_cpu(a) for a in args], **{k: _on_cpu(v) for k, v in (kwargs or {}).items()})


@pytest.fixture
def busy_checkpoint(stage1_checkpoint, tmp_path):
    """The Stage-1 checkpoint with random EMA weights (its zero-initialised paths too), so that every layer moves
    the samples and bf16's rounding shows in them."""
    model = checkpoint.model_from_state(checkpoint.load(stage1_checkpoint), "ema")
    randomize_zero_inits(model, std=0.05)
    state = checkpoint.load(stage1_checkpoint)
    state["ema"] = model.state_dict()
    path = tmp_path / "busy.pt"
    checkpoint.save_atomic(state, path)
    return path


def test_the_transformer_is_bf16_on_cuda_unless_fp32():
    assert inference_dtype(torch.device("cuda", 3)) == inference_dtype("cuda") == torch.bfloat16
    assert inference_dtype("cuda", fp32=True) == inference_dtype("cpu") == inference_dtype("cpu", True) == torch.float32


def test_a_cuda_pipeline_samples_in_bf16_and_stays_within_bf16_precision_of_fp32(busy_checkpoint):
    """load_pipeline on (fake) CUDA: bf16 weights, bf16 inputs to every forward, float32 back to the ODE; --fp32's
    pipeline float32 throughout. Their images differ (bf16 really ran) by no more than bf16's precision allows:
    latents in [-1, 1] to 0..255, 4 Euler steps of a model of depth 2, each output rounded to 8 significant bits
    (2^-8 of a unit value is 1/3 of a level), and guidance 2 forming v_u + 2 (v_c - v_u), whose rounding error is up to
    3 times one forward's: at most 12 levels anywhere and 1 on average, where a model run in float32 agrees to 0.
    (Measured on the shared perturbed fixture: 6 and 0.86.)"""
    inputs = []

    def spy(module, args, kwargs):
        inputs.append(args[0].dtype)

    with CudaOnCpu():
        bf16, fp32 = load_pipeline(busy_checkpoint, device="cuda"), load_pipeline(busy_checkpoint, device="cuda",
                                                                                   fp32=True)
        assert bf16.device.type == "cuda" and bf16.dtype == torch.bfloat16 and fp32.dtype == torch.float32
        assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
        hook = bf16.model.register_forward_pre_hook(spy, with_kwargs=True)
        request = dict(labels=[0, 1, 2, 3], seeds=[0, 1, 2, 3], steps=4, cfg_scale=2.0)
        low = bf16.generate(**request).int()
        hook.remove()
        high = fp32.generate(**request).int()
    assert inputs and set(inputs) == {torch.bfloat16}
    again = load_pipeline(busy_checkpoint, device="cpu").generate(**request).int()
    assert torch.equal(again, high)  # the CPU samples in float32, as --fp32 does on CUDA
    diff = (low - high).abs()
    assert diff.max() > 0 and diff.max() <= 12 and diff.float().mean() <= 1.0, (diff.max(), diff.float().mean())


@pytest.mark.parametrize("module, required", [
    ("app.sample", ["--model-path", "x", "--out-dir", "y"]),
    ("app.gradio_app", ["--model-path", "x"]),
    ("evaluation.evaluate", ["--model-path", "x"]),
    ("evaluation.sample_many", ["--model-path", "x", "--out-dir", "y", "--num-samples", "2"]),
])
def test_every_front_end_has_the_fp32_flag(module, required):
    import importlib

    parse = importlib.import_module(module).parse_args
    assert parse([*required, "--fp32"]).fp32 is True and parse(required).fp32 is False


def test_the_flag_reaches_the_pipeline(stage1_checkpoint, tmp_path, monkeypatch):
    """app/sample.py, the Gradio app's loader, python -m evaluation.embedded and evaluation.sample_many hand
    --fp32 to load_pipeline."""
    import app.pipeline
    from app import gradio_app, gradio_ui
    from app import sample as sample_cli
    from evaluation import embedded, sample_many

    real, seen = app.pipeline.load_pipeline, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("fp32"))
        return real(*args, **kwargs)

    monkeypatch.setattr(app.pipeline, "load_pipeline", spy)
    monkeypatch.setattr(gradio_ui, "load_pipeline", spy)
    sample_cli.main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "s"), "--class-label", "0",
                     "--steps", "1", "--fp32"])
    gradio_ui.load_or_exit(gradio_app.parse_args(["--model-path", str(stage1_checkpoint), "--fp32"]))
    embedded.main(["--model-path", str(stage1_checkpoint), "--num-samples", "2", "--steps", "1", "--fp32"])
    sample_many.main(["--model-path", str(stage1_checkpoint), "--out-dir", str(tmp_path / "m"), "--num-samples",
                      "2", "--steps", "1", "--device", "cpu", "--fp32"])
    assert seen == [True] * 4


def test_a_fid_run_refuses_to_continue_in_another_dtype(tmp_path):
    """sample_many records the dtype in its settings: bf16 and fp32 samples are not mixed in one .npz; a run from
    before the dtype was recorded (float32) continues in float32."""
    import json

    from evaluation import sample_many as sm

    plan = sm.Plan("m.pt", 4, 2, 0, 2, 1.0, (0.0, 1.0), 1.0, "euler", "ema", "uniform", None, "bfloat16")
    (tmp_path / sm.SETTINGS).write_text(json.dumps({k: v for k, v in json.loads(json.dumps(
        argparse.Namespace(**sm.asdict(plan)).__dict__)).items() if k != "dtype"}))
    with pytest.raises(ValueError, match="dtype: 'float32' then, 'bfloat16' now"):
        sm.check_settings(tmp_path, plan)
    sm.check_settings(tmp_path, sm.Plan(*list(sm.asdict(plan).values())[:-1]))
