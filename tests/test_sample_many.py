"""evaluation/sample_many.py: per-index determinism, the split over ranks, resume without regenerating or
duplicating an index, refusal of other settings, the ADM layout."""

import json

import numpy as np
import pytest

from app.pipeline import load_pipeline
from core.ranks import Ranks
from evaluation import sample_many as sm
from evaluation.npz import read_npz


def _plan(path, n=10, batch=4, **kw) -> sm.Plan:
    base = dict(model_path=str(path), num_samples=n, batch_size=batch, seed=3, steps=2, cfg_scale=2.0,
                cfg_interval=(0.0, 1.0), alpha=1.0, method="euler", weights="ema", labels="uniform",
                captions_from=None)
    return sm.Plan(**(base | kw))


def same_pixels(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to one level: a batch of one and a batch of four may round a pixel differently."""
    return bool(np.abs(a.astype(int) - b.astype(int)).max() <= 1)


@pytest.fixture(scope="module")
def class_pipe(stage1_checkpoint):
    return load_pipeline(stage1_checkpoint, device="cpu")


def test_class_samples_split_over_ranks_match_single_draws(class_pipe, stage1_checkpoint, tmp_path):
    """Two ranks' shares (drawn one after the other here) give what one image per generate() call gives."""
    plan = _plan(stage1_checkpoint)
    todo = sm.missing_parts(tmp_path, plan)
    shares = [sm.share(todo, Ranks(rank, 2)) for rank in (0, 1)]
    assert shares == [[0, 2], [1]]
    for parts in shares:
        sm.draw(class_pipe, plan, tmp_path, parts, progress=False)
    sm.run(class_pipe, plan, tmp_path, Ranks(), progress=False)  # nothing left to draw: assembles
    data = read_npz(tmp_path / sm.SAMPLES, "samples")
    assert data["arr_0"].shape == (10, 32, 32, 3) and data["arr_0"].dtype == np.uint8
    k = class_pipe.conditioning.num_classes
    labels = [int(np.random.default_rng([3, i]).integers(k)) for i in range(10)]  # the documented rule
    assert data["arr_1"].tolist() == labels
    settings = dict(steps=2, cfg_scale=2.0, alpha=1.0)
    for i in (0, 5, 9):
        alone = class_pipe.generate(labels=[labels[i]], seeds=[3 + i], **settings)[0].numpy()
        assert same_pixels(alone, data["arr_0"][i])
        # Another seed or another label is another image (the fixture is not gray), so the line above can fail.
        other_seed = class_pipe.generate(labels=[labels[i]], seeds=[4 + i], **settings)[0].numpy()
        other_label = class_pipe.generate(labels=[(labels[i] + 1) % k], seeds=[3 + i], **settings)[0].numpy()
        assert not same_pixels(other_seed, data["arr_0"][i]) and not same_pixels(other_label, data["arr_0"][i])
    summary = json.loads((tmp_path / "samples.json").read_text())
    assert summary["drawn_now"] == 0 and summary["already_there"] == 3


def test_resume_draws_only_what_is_missing_and_refuses_other_settings(class_pipe, stage1_checkpoint, tmp_path):
    plan = _plan(stage1_checkpoint, labels="balanced")
    sm.run(class_pipe, plan, tmp_path, Ranks(), png=True, progress=False)
    first = read_npz(tmp_path / sm.SAMPLES, "samples")["arr_0"].copy()
    assert read_npz(tmp_path / sm.SAMPLES, "samples")["arr_1"].tolist() == [i % 4 for i in range(10)]
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == [f"{i:06d}.png" for i in range(10)]
    kept = sm.part_path(tmp_path, 0).stat().st_mtime_ns
    sm.part_path(tmp_path, 1).unlink()  # as if the run had been killed before part 1 was written
    sm.run(class_pipe, plan, tmp_path, Ranks(), png=True, progress=False)
    summary = json.loads((tmp_path / "samples.json").read_text())
    assert summary["drawn_now"] == 1 and summary["already_there"] == 2
    assert sm.part_path(tmp_path, 0).stat().st_mtime_ns == kept
    np.testing.assert_array_equal(read_npz(tmp_path / sm.SAMPLES, "samples")["arr_0"], first)
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 then, 3 now\)"):
        sm.run(class_pipe, _plan(stage1_checkpoint, labels="balanced", steps=3), tmp_path, Ranks(), progress=False)


def test_text_samples_carry_their_captions(stage2_checkpoint, tmp_path):
    captions = ["a large red circle in the top left on a gray background", "a small blue star in the center"]
    (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n\n")
    pipe = load_pipeline(stage2_checkpoint, device="cpu")
    plan = _plan(stage2_checkpoint, n=5, batch=2, labels="captions", captions_from="captions.txt")
    with pytest.raises(ValueError, match="needs captions"):
        sm.run(pipe, plan, tmp_path / "none", Ranks(), progress=False)
    sm.run(pipe, plan, tmp_path / "out", Ranks(), captions=sm.read_captions(tmp_path / "captions.txt"),
           progress=False)
    data = read_npz(tmp_path / "out" / sm.SAMPLES, "samples")
    assert data["captions"].tolist() == [captions[i % 2] for i in range(5)] and "arr_1" not in data
    settings = dict(steps=2, cfg_scale=2.0, alpha=1.0)
    alone = pipe.generate(prompts=[captions[0]], seeds=[3 + 4], **settings)[0].numpy()
    assert same_pixels(alone, data["arr_0"][4])
    # Another seed or another caption is another image (the fixture is not gray), so the line above can fail.
    other_seed = pipe.generate(prompts=[captions[0]], seeds=[3 + 5], **settings)[0].numpy()
    other_caption = pipe.generate(prompts=[captions[1]], seeds=[3 + 4], **settings)[0].numpy()
    assert not same_pixels(other_seed, data["arr_0"][4]) and not same_pixels(other_caption, data["arr_0"][4])


def test_captions_from_a_shard_folder(embedded_data):
    folder = embedded_data / "synthetic-32" / "shards-text"
    captions = sm.read_captions(folder)
    assert len(captions) == 160 and all(c.startswith("a ") for c in captions)
    with pytest.raises(ValueError, match="no manifest.json"):
        sm.read_captions(embedded_data)


def test_cli_refuses_bad_flags(capsys):
    for argv, message in ((["--num-samples", "0"], "--num-samples: must be a whole number >= 1"),
                          (["--num-samples", "4", "--seed", "-1"], "--seed: must be a whole number >= 0")):
        with pytest.raises(SystemExit):
            sm.parse_args(["--model-path", "x", "--out-dir", "y", *argv])
        assert message in capsys.readouterr().err


def test_cli_end_to_end_and_again(stage1_checkpoint, tmp_path, capsys):
    argv = ["--model-path", str(stage1_checkpoint.parent.parent), "--num-samples", "3", "--batch-size", "2",
            "--steps", "2", "--out-dir", str(tmp_path), "--device", "cpu"]
    target = sm.main(argv)
    assert capsys.readouterr().out.strip() == str(target)
    assert read_npz(target, "samples")["arr_0"].shape == (3, 32, 32, 3)
    sm.main(argv)
    assert json.loads((tmp_path / "samples.json").read_text())["drawn_now"] == 0
    with pytest.raises(SystemExit, match="other settings"):
        sm.main([*argv[:-4], "--seed", "1", *argv[-4:]])


def test_cli_refuses_captions_for_a_class_checkpoint(stage1_checkpoint, tmp_path):
    (tmp_path / "c.txt").write_text("a red circle\n")
    with pytest.raises(SystemExit, match="class-conditional: --captions and --caption-shards are for text"):
        sm.main(["--model-path", str(stage1_checkpoint), "--num-samples", "2", "--out-dir", str(tmp_path / "o"),
                 "--captions", str(tmp_path / "c.txt"), "--device", "cpu"])


# ---- parts it cannot vouch for (issue 25, item 7) ------------------------------------------------------------


def test_without_sampling_json_a_rerun_with_another_seed_redraws_every_part(class_pipe, stage1_checkpoint, tmp_path,
                                                                             capsys):
    """Each part records its plan's hash: with sampling.json gone, another seed's run finds the old parts foreign,
    names them, and draws its own (the reference: the same plan drawn in an empty folder)."""
    sm.run(class_pipe, _plan(stage1_checkpoint, seed=3), tmp_path / "a", Ranks(), progress=False)
    (tmp_path / "a" / sm.SETTINGS).unlink()
    other = _plan(stage1_checkpoint, seed=4)
    sm.run(class_pipe, other, tmp_path / "a", Ranks(), progress=False)
    err = capsys.readouterr().err
    assert f"{sm.part_path(tmp_path / 'a', 0)}: drawn with other settings" in err
    sm.run(class_pipe, other, tmp_path / "fresh", Ranks(), progress=False)
    np.testing.assert_array_equal(read_npz(tmp_path / "a" / sm.SAMPLES, "s")["arr_0"],
                                  read_npz(tmp_path / "fresh" / sm.SAMPLES, "s")["arr_0"])
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["drawn_now"] == 3


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    """One byte of the images changed, the size kept: only the zip's CRC shows it."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _foreign(path):
    """Another part's file (its indices) under this part's name."""
    path.write_bytes(path.with_name("part-000000.npz").read_bytes())


@pytest.mark.parametrize("damage", [_truncate, _flip, _foreign], ids=["truncated", "flipped", "other-indices"])
def test_a_damaged_part_is_named_and_drawn_again(class_pipe, stage1_checkpoint, tmp_path, capsys, damage):
    plan = _plan(stage1_checkpoint)
    sm.run(class_pipe, plan, tmp_path, Ranks(), progress=False)
    first = read_npz(tmp_path / sm.SAMPLES, "s")["arr_0"].copy()
    part = sm.part_path(tmp_path, 1)
    damage(part)
    sm.run(class_pipe, plan, tmp_path, Ranks(), progress=False)
    err = capsys.readouterr().err
    assert f"{part}: " in err and "drawing it again" in err and part.with_name(part.name + ".rejected").is_file()
    assert json.loads((tmp_path / "samples.json").read_text())["drawn_now"] == 1
    np.testing.assert_array_equal(read_npz(tmp_path / sm.SAMPLES, "s")["arr_0"], first)


def test_an_unreadable_sampling_json_or_a_file_as_out_dir_is_named(class_pipe, stage1_checkpoint, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / sm.SETTINGS).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'out' / sm.SETTINGS} is unreadable"):
        sm.run(class_pipe, _plan(stage1_checkpoint), tmp_path / "out", Ranks(), progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="a file, not a folder"):
        sm.run(class_pipe, _plan(stage1_checkpoint), tmp_path / "file", Ranks(), progress=False)
