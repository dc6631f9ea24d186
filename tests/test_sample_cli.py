"""The sampling CLI reads everything from the checkpoint and is deterministic in the seed."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.sample import main as sample_main
from tests.stages import stage_config
from trainer.loop import train


@pytest.fixture(scope="module")
def stage1_checkpoint(embedded_data, tmp_path_factory) -> Path:
    cfg = stage_config(1, embedded_data, tmp_path_factory.mktemp("run"), "train.max_steps=2")
    return Path(train(cfg)["checkpoint"])


def test_cli_writes_pngs_and_grid_deterministically(stage1_checkpoint, tmp_path):
    args = ["--model-path", str(stage1_checkpoint), "--class-label", "1", "--num-samples", "2", "--steps", "3"]
    sample_main(args + ["--seed", "5", "--out-dir", str(tmp_path / "a")])
    sample_main(args + ["--seed", "5", "--out-dir", str(tmp_path / "b")])
    sample_main(args + ["--seed", "6", "--out-dir", str(tmp_path / "c")])
    a = np.asarray(Image.open(tmp_path / "a" / "class_1_seed_5_0.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "class_1_seed_5_0.png"))
    c = np.asarray(Image.open(tmp_path / "c" / "class_1_seed_6_0.png"))
    assert a.shape == (32, 32, 3) and (tmp_path / "a" / "grid.png").exists()
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_cli_rejects_out_of_range_class(stage1_checkpoint, tmp_path):
    with pytest.raises(SystemExit, match="out of range"):
        sample_main(["--model-path", str(stage1_checkpoint), "--class-label", "9", "--out-dir", str(tmp_path)])


def test_cli_rejects_a_file_that_is_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="x.pt"):
        sample_main(["--model-path", str(bad), "--out-dir", str(tmp_path)])
