"""Non-square sizes after training: the pixel analyser and the held-out evaluation, the pipeline's buckets, the
sampler CLI's --bucket and the Gradio app's size picker."""

import shlex

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app.gradio_ui import Generator, build_app
from app.pipeline import load_pipeline
from app.sample import main as sample_main
from app.validation import Limits
from data.embedded.synthetic import held_out_specs, render_scene
from evaluation.analyse import analyse_scene
from tests.test_analyse import degrade, training_specs

PROMPT = "a large red circle in the top left on a gray background"


@pytest.mark.parametrize("height, width", [(32, 48), (48, 32), (40, 56), (24, 64)])
@pytest.mark.parametrize("degraded", [False, True], ids=["clean", "blur+noise"])
def test_the_analyser_reads_non_square_scenes(height, width, degraded):
    """Every held-out triple and the training sample, rendered at a non-square size: read back right, the centroid
    in the named position's cell of each axis' thirds."""
    failures = []
    for index, spec in enumerate(held_out_specs() + training_specs()):
        image = render_scene(spec, (height, width))
        pixels = degrade(image, seed=97 * height + width + index) if degraded else np.asarray(image)
        reading = analyse_scene(pixels, background=spec.background)
        truth = spec.shapes[0]
        read = None if reading is None else (reading.colour, reading.shape, reading.position, reading.in_region)
        if read != (*truth.triple, True):
            failures.append(f"{truth} at {height}x{width}: {reading}")
    assert failures == []


@pytest.fixture(scope="module")
def text_pipe(stage2_checkpoint):
    return load_pipeline(stage2_checkpoint, device="cpu")


def test_the_evaluation_runs_at_a_non_square_size(stage2_checkpoint, tmp_path):
    from evaluation.evaluate import main as evaluate_main

    report = evaluate_main(["--model-path", str(stage2_checkpoint), "--samples-per-prompt", "1", "--steps", "1",
                            "--height", "32", "--width", "48", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert (report["settings"]["height"], report["settings"]["width"]) == (32, 48)
    assert report["accuracy"]["n"] == 40
    grid = Image.open(tmp_path / "grid.png")
    assert grid.width > grid.height / 40 * 48 / 32  # cells wider than tall


def test_the_pipeline_offers_buckets_and_draws_at_them(text_pipe, stage2_checkpoint, tmp_path, capsys):
    """A 32 px pixel-space checkpoint with patch 4: PixArt-alpha's rule at 32 px in steps of 4 (multiples of the
    unit, area within [0.9, 1] x 32^2, aspect within 4), the trained square among them; a bucket is drawn at its
    size, by the pipeline and by the CLI's --bucket alike."""
    buckets = text_pipe.buckets
    assert (32, 32) in buckets and (24, 40) in buckets and (40, 24) in buckets
    for h, w in buckets:
        assert h % 4 == 0 and w % 4 == 0 and 0.9 * 1024 <= h * w <= 1024 and max(h, w) <= 4 * min(h, w)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True)
    direct = text_pipe.generate(prompts=[PROMPT], seeds=[3], steps=2, height=24, width=40).numpy()[0]
    assert direct.shape == (24, 40, 3)
    sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--seed", "3", "--steps", "2",
                 "--bucket", "24x40", "--out-dir", str(tmp_path)])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "prompt_00_seed_3.png")), direct)
    with pytest.raises(SystemExit, match="--bucket sets --height and --width"):
        sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--bucket", "24x40", "--height",
                     "24", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--bucket: '24\\*40' is not a bucket"):
        sample_main(["--model-path", str(stage2_checkpoint), "--prompt", PROMPT, "--bucket", "24*40",
                     "--out-dir", str(tmp_path)])
    capsys.readouterr()
    sample_main(["--model-path", str(stage2_checkpoint), "--list-buckets", "--out-dir", str(tmp_path)])
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [f"{h}x{w}" for h, w in buckets]


def test_the_app_picks_a_bucket(text_pipe, stage2_checkpoint, tmp_path):
    demo = build_app(text_pipe, source=stage2_checkpoint)
    (picker,) = [b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label.startswith("Size")]
    assert [value for _, value in picker.choices] == [f"{h}x{w}" for h, w in text_pipe.buckets]
    assert picker.value == "32x32"
    handlers = Generator(text_pipe, None, Limits(), str(stage2_checkpoint))
    gallery, _, _, _, status = handlers.generate_text(PROMPT, False, 2, 3.0, 0.0, 1.0, 1.0, "euler", 7, False, 1,
                                                      False, "24x40")
    image = gallery[0][0]
    assert image.shape == (24, 40, 3)
    assert np.array_equal(image, text_pipe.generate(prompts=[PROMPT], seeds=[7], steps=2, height=24,
                                                    width=40).numpy()[0])
    argv = shlex.split(status.split("```")[1])[3:]  # after "python -m app.sample"
    assert argv[argv.index("--bucket") + 1] == "24x40"
    argv[argv.index("--out-dir") + 1] = str(tmp_path)
    sample_main(argv)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "prompt_00_seed_7.png")), image)
    for bad in ("24*40", "30x40"):
        with pytest.raises(gr.Error, match="Size must be|multiples of 4"):
            handlers.generate_text(PROMPT, False, 2, 3.0, 0.0, 1.0, 1.0, "euler", 7, False, 1, False, bad)
