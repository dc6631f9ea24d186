"""An input tar cut short (on disk, or a download that closes before its Content-Length) fails that tar.

The tars come from the repository's embedded builder (data/embedded/build.py). Where a cut may fall is
worked out here from the whole tar with tarfile's random-access reader, not by the pipeline: a tar is
complete only from the end of the two zero blocks after its last member on (the rest of the file is record
padding). Every shorter cut must leave no done marker, no shards and no manifest, name the tar, and a rerun
with the whole tar must give exactly the clean run's shards.
"""

import gzip
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from core.vae import IdentityVAE
from data.embedded.build import build
from data.make_shards import main as cli_main
from data.pipeline import sources
from data.pipeline.captioners import TarCaptioner
from data.pipeline.run import PipelineConfig, RankResult, marker_path, run_rank
from data.validate import validate
from tests.helpers import loopback_file_server
from tests.test_pipeline import assert_same_dataset

SIZE, PER_TAR, TARS = 16, 3, 3
BLOCK = tarfile.BLOCKSIZE


@pytest.fixture(scope="module")
def tars(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("embedded")
    build("synthetic", root, image_size=SIZE, num_samples=PER_TAR * TARS, samples_per_tar=PER_TAR, progress=False)
    return sorted(root.glob("*.tar"))


def archive_end(data: bytes) -> int:
    """First byte after the end-of-archive blocks: the shortest prefix that is a complete tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // BLOCK) * BLOCK
    assert data[end : end + 2 * BLOCK] == bytes(2 * BLOCK) and len(data) > end + 2 * BLOCK  # padding follows
    return end + 2 * BLOCK


def cut_points(data: bytes, random: int, seed: int = 0) -> list[int]:
    """Every header and data boundary (and one byte either side) plus `random` uniform cut points."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    end = archive_end(data)
    edges = {0, end - 2 * BLOCK, end - BLOCK, end, len(data) - 1}
    for m in members:
        edges |= {m.offset, m.offset + BLOCK // 2, m.offset_data, m.offset_data + m.size}
    near = {e + d for e in edges for d in (-1, 0, 1)}
    rng = np.random.default_rng(seed)
    return sorted({c for c in near if 0 <= c < len(data)} | set(rng.integers(1, len(data), random).tolist()))


def run(inputs: list[str], out: Path) -> RankResult:
    cfg = PipelineConfig(inputs, out, kind="labels", image_size=SIZE, num_classes=4, progress=False)
    cfg.records_per_shard, cfg.batch_size, cfg.decode_workers = 2, 2, 2  # two shards per tar: a partial is left
    return run_rank(cfg, TarCaptioner(short=False), None, IdentityVAE())


def assert_refused(result: RankResult, url: str, out: Path, why: str) -> None:
    stem = sources.input_stem(url)
    assert not marker_path(out, stem).exists() and result.manifest is None, url
    assert list(result.failed) == [url] and why in result.failed[url], (url, result.failed)
    assert not (out / "manifest.json").exists()
    assert not [p.name for p in out.glob(f"*shard-{stem}-*")]  # partial shards removed, temp files too


@pytest.fixture(scope="module")
def clean(tars, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean")
    result = run([str(tars[0])], out)
    assert result.manifest["num_records"] == PER_TAR and validate(out) == []
    return out


@pytest.mark.slow
def test_every_cut_of_a_tar_on_disk_is_refused_or_complete(tars, clean, tmp_path):
    data = tars[0].read_bytes()
    end = archive_end(data)
    cuts = cut_points(data, random=60)
    assert sum(c >= end for c in cuts) >= 5 and sum(c < end for c in cuts) >= 50
    # The cuts short of complete first, longest first: those are the ones that used to pass as complete.
    for i, cut in enumerate(sorted(cuts, key=lambda c: (c >= end, -c))):
        src = tmp_path / f"in-{cut}" / tars[0].name
        src.parent.mkdir()
        src.write_bytes(data[:cut])
        out = tmp_path / f"out-{cut}"
        result = run([str(src)], out)
        if cut >= end:
            assert marker_path(out, tars[0].stem).exists() and not result.failed, cut
            assert_same_dataset(out, clean)
            continue
        assert_refused(result, str(src), out, "")
        if i % 8 == 0:  # a rerun with the whole tar redoes it and gives the clean run's shards
            src.write_bytes(data)
            again = run([str(src)], out)
            assert again.processed == [str(src)] and not again.failed and validate(out) == []
            assert_same_dataset(out, clean)


def test_a_download_cut_short_of_its_content_length_is_refused(tars, clean, tmp_path):
    data = tars[0].read_bytes()
    end = archive_end(data)
    name = tars[0].name
    cuts = [c for c in cut_points(data, random=15, seed=1) if c % 4 == 0 or c >= end - 2 * BLOCK]
    assert any(c >= end for c in cuts)
    with loopback_file_server({name: data}) as server:
        url = f"{server['url']}/{name}"
        out = tmp_path / "out"
        for cut in reversed(cuts):
            server["cut"][name] = cut
            result = run([url], out)
            # A cut past the archive's end leaves a readable tar: only the byte count shows it was cut.
            assert_refused(result, url, out, "Content-Length" if cut >= end else "")
        server["cut"].pop(name)
        result = run([url], out)
        assert result.processed == [url] and not result.failed and validate(out) == []
        assert_same_dataset(out, clean)


def test_a_damaged_header_in_the_middle_is_refused(tars, tmp_path):
    """tarfile ends its iteration silently at a header whose checksum is wrong: the tail would be lost."""
    data = bytearray(tars[0].read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2].offset
    data[middle : middle + BLOCK] = b"x" * BLOCK
    src = tmp_path / "in" / tars[0].name
    src.parent.mkdir()
    src.write_bytes(bytes(data))
    assert_refused(run([str(src)], tmp_path / "out"), str(src), tmp_path / "out", f"header at byte {middle}")


def test_a_compressed_tar_cut_short_is_refused(tars, clean, tmp_path):
    packed = gzip.compress(tars[0].read_bytes(), mtime=0)
    src = tmp_path / "in" / f"{tars[0].stem}.tar.gz"
    src.parent.mkdir()
    # Without the last 4 bytes of the gzip trailer (the length) the tar inside is whole, the file is not.
    for cut in (len(packed) - 4, len(packed) // 2):
        src.write_bytes(packed[:cut])
        assert_refused(run([str(src)], tmp_path / f"out-{cut}"), str(src), tmp_path / f"out-{cut}", "")
    src.write_bytes(packed)
    result = run([str(src)], tmp_path / "whole")
    assert not result.failed
    assert_same_dataset(tmp_path / "whole", clean)


def test_a_pipe_that_stops_early_is_refused(tars, tmp_path):
    url = f"pipe:head -c {archive_end(tars[0].read_bytes()) - BLOCK} {tars[0]}"
    assert_refused(run([url], tmp_path), url, tmp_path, "truncated")


def test_cli_goes_on_with_the_other_tars_and_exits_non_zero(tars, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for tar in tars:
        (inputs / tar.name).write_bytes(tar.read_bytes())
    data = tars[1].read_bytes()
    (inputs / tars[1].name).write_bytes(data[: len(data) // 3])
    argv = ["--input-glob", str(inputs / "*.tar"), "--kind", "labels", "--num-classes", "4", "--vae", "identity"]
    argv += ["--image-size", str(SIZE), "--records-per-shard", "2", "--quiet"]
    out = tmp_path / "out"
    assert cli_main([*argv, "--out-dir", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{tars[1].name}" in captured.err and "rerun" in captured.err
    assert "2 inputs processed, 0 skipped, 1 failed" in captured.out
    markers = sorted(p.name for p in (out / "progress").iterdir())
    assert markers == [f"{tars[0].stem}.done.json", f"{tars[2].stem}.done.json"]
    assert not (out / "manifest.json").exists() and not list(out.glob(f"*{tars[1].stem}*"))
    assert cli_main([*argv, "--out-dir", str(out), "--finalize"]) == 1
    assert "1 of 3 input tars are not done" in capsys.readouterr().err

    (inputs / tars[1].name).write_bytes(data)
    assert cli_main([*argv, "--out-dir", str(out)]) == 0
    assert "1 inputs processed, 2 skipped, 0 failed" in capsys.readouterr().out
    clean = tmp_path / "clean"
    assert cli_main([*argv, "--out-dir", str(clean)]) == 0
    assert validate(out) == [] and json.loads((out / "manifest.json").read_text())["num_records"] == PER_TAR * TARS
    assert_same_dataset(out, clean)
