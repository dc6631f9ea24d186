"""The sampling CLI reads everything from the checkpoint and is deterministic in the seed."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.sample import main as sample_main


def read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_cli_writes_pngs_and_grid_deterministically(stage1_checkpoint, tmp_path):
    args = ["--model-path", str(stage1_checkpoint), "--class-label", "1", "--num-samples", "2", "--steps", "3"]
    sample_main(args + ["--seed", "5", "--out-dir", str(tmp_path / "a")])
    sample_main(args + ["--seed", "5", "--out-dir", str(tmp_path / "b")])
    sample_main(args + ["--seed", "6", "--out-dir", str(tmp_path / "c")])
    a5, a6 = read(tmp_path / "a" / "class_1_seed_5.png"), read(tmp_path / "a" / "class_1_seed_6.png")
    assert a5.shape == (32, 32, 3) and (tmp_path / "a" / "grid.png").exists()
    assert np.array_equal(a5, read(tmp_path / "b" / "class_1_seed_5.png")) and not np.array_equal(a5, a6)
    # A sample's pixels depend on its seed alone, not on its place in the batch.
    assert np.array_equal(a6, read(tmp_path / "c" / "class_1_seed_6.png"))


def test_cli_samples_text_checkpoints_from_metadata_with_a_gif(stage2_checkpoint, tmp_path):
    prompt = "a large red circle in the top left on a gray background"
    sample_main(["--model-path", str(stage2_checkpoint), "--prompt", prompt, "--steps", "2", "--gif",
                 "--out-dir", str(tmp_path)])
    image = read(tmp_path / "prompt_00_seed_0.png")
    assert image.shape == (32, 32, 3)
    gif = Image.open(tmp_path / "prompt_00_seed_0.gif")
    assert gif.n_frames == 3  # the noise, then one frame per step


def test_cli_rejects_the_wrong_kind_of_input(stage1_checkpoint, stage2_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="out of range"):
        sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "9", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="class-conditional: use --class-label"):
        sample_main(["--model-path", str(stage1_checkpoint), "--prompt", "a cat", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="text-conditional"):
        sample_main(["--model-path", str(stage2_checkpoint), "--class-label", "1", "--out-dir", str(tmp_path)])


def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="x.pt"):
        sample_main(["--model-path", str(bad), "--out-dir", str(tmp_path)])


def test_cli_height_and_width(stage1_checkpoint, tmp_path):
    """Pixel-space models take any multiple of the patch (4 px here): a 32 x 48 sample, and a clear refusal."""
    sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "0", "--steps", "2", "--height", "32",
                 "--width", "48", "--out-dir", str(tmp_path)])
    assert read(tmp_path / "class_0_seed_0.png").shape == (32, 48, 3)
    with pytest.raises(SystemExit, match="--width 30: this model takes multiples of 4 pixels"):
        sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "0", "--width", "30",
                     "--out-dir", str(tmp_path)])


PROMPT = "a large red circle in the top left on a gray background"


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cfg-scale", "nan"], "--cfg-scale must be between 0.0 and 20.0, got nan"),
        (["--cfg-scale", "inf"], "--cfg-scale must be between 0.0 and 20.0, got inf"),
        (["--steps", "0"], "--steps must be between 1 and 1000, got 0"),
        (["--alpha", "nan"], "--alpha must be between 0.1 and 10.0, got nan"),
        (["--height", "0"], "--height 0: this model takes multiples of 4 pixels"),
        (["--width", "-8"], "--width -8: this model takes multiples of 4 pixels"),
        (["--cfg-interval", "0.8", "0.2"], "--cfg-interval LO (0.8) must not be after --cfg-interval HI (0.2)"),
        (["--cfg-interval", "0", "1.5"], "--cfg-interval HI must be between 0.0 and 1.0, got 1.5"),
        (["--num-samples", "0"], "--num-samples must be between 1 and 4096, got 0"),
        (["--seed", "-1"], "--seed: the seeds run from -1 to -1; they must lie within 0..2147483647"),
        (["--prompt", "   "], "--prompt #2 is empty: describe the image to generate"),
        (["--prompt", "a" * 10_000], "--prompt #2 is 10000 characters long; at most 1000 (--max-prompt-chars"),
        (["--prompt", "red circle " * 40], "--prompt #2 is 82 tokens long, but this checkpoint's text encoder "
                                           "reads only the first 32: shorten it"),
        (["--height", "4096", "--width", "4096"], "4096x4096 pixels x 2 euler steps x 1 image with guidance = "),
        (["--max-tflop", "1e-9"], "over the budget of 1e-09 TFLOP: draw fewer or smaller images, or fewer steps "
                                  "(--max-tflop raises it)"),
        (["--max-tflop", "nan"], "--max-tflop must be between 1e-09 and 1000000000000.0, got nan"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line_naming_the_flag(stage2_checkpoint, tmp_path, extra, message):
    """The checks app/validation.py shares with the app; nothing is written when a setting is refused. The token
    count is BERT's: 2 words x 40 + [CLS] and [SEP]."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--steps", "2", *extra,
                     "--out-dir", str(out)])
    text = str(err.value.code)
    assert message in text and "\n" not in text
    assert not out.exists()


def test_cli_budget_flag_raises_the_budget(stage1_checkpoint, tmp_path):
    """The budget is the request's teraFLOP: one guided euler step of one 64 x 64 image costs two evaluations."""
    from app.pipeline import load_pipeline

    tflop = 2 * load_pipeline(stage1_checkpoint, device="cpu").evaluation_flops(64, 64) / 1e12
    args = ["--model-path", str(stage1_checkpoint), "--class-label", "0", "--steps", "1", "--height", "64",
            "--width", "64", "--out-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="--max-tflop raises it"):
        sample_main(args + ["--max-tflop", repr(tflop * (1 - 1e-9))])
    sample_main(args + ["--max-tflop", repr(tflop)])
    assert read(tmp_path / "class_0_seed_0.png").shape == (64, 64, 3)


def test_the_cost_grows_with_the_square_of_the_tokens(stage1_checkpoint):
    """The counted FLOPs of one evaluation are a quadratic in the token count n whose n^2 term is attention's
    closed form: Q K^T and the weighting of V take 2 n^2 d each in every block (d the width, summed over heads).
    Fitted exactly through three sizes, with nothing of the count's own code."""
    from fractions import Fraction

    from app.pipeline import load_pipeline

    pipe = load_pipeline(stage1_checkpoint, device="cpu")
    cfg = pipe.model.config
    sides = [32, 64, 96]  # pixels; patch 4, pixel space
    n = [Fraction((side // cfg.patch) ** 2) for side in sides]
    f = [Fraction(pipe.evaluation_flops(side, side)) for side in sides]
    slope = [(f[1] - f[0]) / (n[1] - n[0]), (f[2] - f[1]) / (n[2] - n[1])]
    quadratic = (slope[1] - slope[0]) / (n[2] - n[0])
    assert quadratic == 4 * cfg.dim * cfg.depth
    assert pipe.evaluation_flops(32, 64) == pipe.evaluation_flops(64, 32)  # the tokens, not the shape


def test_a_request_quadratic_in_cost_is_refused_before_it_runs(stage1_checkpoint, tmp_path, monkeypatch):
    """2000 x 2000 px at 4 steps fitted the old budget of pixels x steps (16M) and ran for half an hour on the
    app's worker; its attention alone is 4 n^2 d x depth x 2 (guidance) x 4 steps with n = 250,000 tokens."""
    import app.pipeline

    def drawn(*args, **kwargs):
        raise AssertionError("the request was drawn")

    monkeypatch.setattr(app.pipeline, "sample", drawn)
    with pytest.raises(SystemExit) as err:
        sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "0", "--steps", "4", "--height",
                     "2000", "--width", "2000", "--out-dir", str(tmp_path / "out")])
    text = str(err.value.code)
    assert "2000x2000 pixels x 4 euler steps x 1 image with guidance" in text and "--max-tflop raises it" in text
    assert not (tmp_path / "out").exists()


def test_cli_takes_a_run_folder_or_its_checkpoints_folder(stage1_checkpoint, tmp_path):
    """The newest checkpoints/step_*.pt of a run folder (the fixture's run holds its final step)."""
    args = ["--class-label", "2", "--steps", "2", "--seed", "3"]
    for name, path in (("file", stage1_checkpoint), ("run", stage1_checkpoint.parent.parent),
                       ("ckpts", stage1_checkpoint.parent)):
        sample_main(["--model-path", str(path), *args, "--out-dir", str(tmp_path / name)])
    file = read(tmp_path / "file" / "class_2_seed_3.png")
    assert np.array_equal(file, read(tmp_path / "run" / "class_2_seed_3.png"))
    assert np.array_equal(file, read(tmp_path / "ckpts" / "class_2_seed_3.png"))


def test_a_request_past_its_time_limit_stops_at_the_next_evaluation(stage1_checkpoint):
    """Limits.time_limit stops the sampler from inside (a thread cannot be stopped from outside): with a limit
    already spent, no evaluation of the model runs; the hook is gone afterwards."""
    from dataclasses import replace

    from app.pipeline import load_pipeline
    from app.validation import BATCH, RequestTimeout

    pipe = load_pipeline(stage1_checkpoint, device="cpu")
    calls = []
    handle = pipe.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(RequestTimeout, match=r"past the time limit of 1e-09 s \(Limits.time_limit\)"):
            pipe.generate(labels=[0], steps=50, limits=replace(BATCH, time_limit=1e-9))
        assert calls == []
        pipe.generate(labels=[0], steps=2)
        assert len(calls) == 2
    finally:
        handle.remove()


@pytest.mark.gpu
def test_the_time_limit_counts_the_gpus_work_not_the_hosts_queueing(stage1_checkpoint):
    """Unguided (no value read back per step), the host could queue every step before any ran; each evaluation
    here also queues 0.1 s of GPU spinning (torch.cuda._sleep), so 100 steps are 10 s of GPU work that the limit
    of 0.5 s must stop within a few evaluations."""
    from dataclasses import replace

    import torch

    from app.pipeline import load_pipeline
    from app.validation import BATCH, RequestTimeout

    pipe = load_pipeline(stage1_checkpoint, device="cuda")
    ends = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ends[0].record()
    torch.cuda._sleep(1_000_000)
    ends[1].record()
    torch.cuda.synchronize()
    cycles = int(1_000_000 * 100 / ends[0].elapsed_time(ends[1]))  # 0.1 s of spinning (elapsed_time: ms)
    calls = []

    def spin(module, args) -> None:
        calls.append(1)
        torch.cuda._sleep(cycles)

    handle = pipe.model.register_forward_pre_hook(spin)
    try:
        with pytest.raises(RequestTimeout):
            pipe.generate(labels=[0], steps=100, cfg_scale=1.0, limits=replace(BATCH, time_limit=0.5))
        assert len(calls) <= 10
    finally:
        handle.remove()


def test_pipeline_generate_checks_its_arguments(stage1_checkpoint):
    from dataclasses import replace

    from app.pipeline import load_pipeline
    from app.validation import BATCH, RequestError

    pipe = load_pipeline(stage1_checkpoint, device="cpu")
    for kwargs, message in [
        (dict(labels=[0], cfg_scale=float("nan")), "cfg_scale= must be between 0.0 and 20.0, got nan"),
        (dict(labels=[True]), r"labels= \[True\] out of range"),
        (dict(labels=[0], seeds=[0, 1]), "2 seeds for 1 images"),
        (dict(labels=[0], height=30), "height= 30: this model takes multiples of 4 pixels"),
        (dict(prompts=["a cat"]), "class-conditional checkpoint: pass labels="),
        (dict(labels=[0], limits=replace(BATCH, pixel_steps=32 * 32 - 1)),
         r"32x32 pixels x 1 step x 1 image = 1,024 pixel-steps, over the cap of 1,023: .*\(Limits.pixel_steps raises"),
        (dict(labels=[0], cuda_graphs=True, limits=replace(BATCH, time_limit=60.0)),
         r"Limits.time_limit cannot stop a replay of CUDA graphs"),
    ]:
        with pytest.raises(RequestError, match=message):
            pipe.generate(steps=1, **kwargs)
