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
