"""Sharded checkpoints that were tampered with or damaged (issue 25, items 3 and 8; docs/HOSTILE_INPUTS.md): a
`.metadata` may not choose which files are read nor how much memory a load takes, and a missing, truncated or
damaged data file stops a resume, `trainer.consolidate` and train.init_from with one error naming the folder, the
resume offering the older checkpoint that loads, as it does for a damaged .pt.

The references are DCP's own records (torch/distributed/checkpoint/metadata.py, filesystem.py) edited the way an
attacker or a failing disk would, and the file system itself (which file exists, its size)."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata

from core import checkpoint, sharded_checkpoint
from core.checkpoint import CheckpointError
from tests.stages import ROOT, stage_config
from trainer.loop import train

ENV = dict(os.environ, OMP_NUM_THREADS="1")
SHARDED = ("device=cpu", "train.checkpoint_format=sharded", "train.ckpt_every=1", "train.eval_batches=0")


@pytest.fixture(scope="module")
def sharded_run(embedded_data, tmp_path_factory) -> Path:
    """A Stage-1 run folder with two sharded checkpoints, step_00000001.dcp and step_00000002.dcp."""
    out = tmp_path_factory.mktemp("sharded-run")
    train(stage_config(1, embedded_data, out, *SHARDED, "train.max_steps=2"))
    return out


@pytest.fixture
def run_copy(sharded_run, tmp_path) -> Path:
    """A copy of the run each test may damage."""
    import shutil

    shutil.copytree(sharded_run, tmp_path / "run")
    (tmp_path / "run" / ".lock").unlink(missing_ok=True)
    return tmp_path / "run"


def newest(run: Path) -> Path:
    return checkpoint.newest(run)


def read_metadata(folder: Path):
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)  # the test's own, trusted file


def write_metadata(folder: Path, metadata) -> None:
    with open(folder / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def first_record(metadata) -> tuple[MetadataIndex, _StorageInfo]:
    return next(iter(metadata.storage_data.items()))


# ---- item 3: the .metadata chooses nothing ------------------------------------------------------------------


@pytest.mark.parametrize("module", ["torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint.metadata"])
def test_a_metadata_pickle_cannot_build_a_tensor(run_copy, module):
    """torch.Tensor is importable from DCP's modules (filesystem.py: `from torch import Tensor`; metadata.py:
    `torch`'s): a pickle that calls it with a size would allocate that much. Only DCP's records are built."""
    folder = newest(run_copy)
    name = "Tensor" if module.endswith("filesystem") else "torch"
    (folder / ".metadata").write_bytes(f"c{module}\n{name}\n(I3\ntR.".encode())
    with pytest.raises(CheckpointError, match=rf"{module}.{name} is not part of a checkpoint's metadata"):
        checkpoint.load(folder)


@pytest.mark.parametrize("target", ["/etc/passwd", "../step_00000001.dcp/__0_0.distcp", "__0_0.distcp/../x"])
def test_a_metadata_cannot_name_a_file_outside_its_folder(run_copy, embedded_data, target):
    """storage_data's relative_path must be a plain __R_N.distcp name: no absolute path, no other checkpoint's
    tensors (which DCP would read and a resume would continue from with exit 0)."""
    folder = newest(run_copy)
    metadata = read_metadata(folder)
    key, info = first_record(metadata)
    metadata.storage_data[key] = _StorageInfo(target, 0, min(info.length, 100))
    write_metadata(folder, metadata)
    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint {folder}: .*not a __R_N.distcp file"):
        checkpoint.load(folder)
    with pytest.raises(CheckpointError, match="not a __R_N.distcp file"):
        train(stage_config(1, embedded_data, run_copy, *SHARDED, "train.max_steps=3"))


def test_a_data_file_that_is_a_link_is_refused(run_copy, tmp_path):
    folder = newest(run_copy)
    data = folder / "__0_0.distcp"
    elsewhere = tmp_path / "elsewhere.distcp"
    data.rename(elsewhere)
    data.symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match="its data file __0_0.distcp is missing"):
        checkpoint.load(folder)


def test_a_metadata_cannot_declare_a_tensor_larger_than_its_stored_chunks(run_copy):
    """read_full allocates each tensor at the size .metadata declares: a size the chunks do not fill would let
    a few bytes of pickle ask for any amount of memory (a modest 4 MB here)."""
    folder = newest(run_copy)
    metadata = read_metadata(folder)
    fqn, item = next((k, v) for k, v in metadata.state_dict_metadata.items() if len(v.size) == 1)
    metadata.state_dict_metadata[fqn] = TensorStorageMetadata(item.properties, torch.Size([10**6]), item.chunks)
    write_metadata(folder, metadata)
    with pytest.raises(CheckpointError, match=rf"declares {fqn} of shape \[1000000\], larger than the chunks"):
        sharded_checkpoint.read_full(folder)


def test_a_chunk_must_lie_inside_its_tensor_and_its_file(run_copy):
    folder = newest(run_copy)
    pristine = (folder / ".metadata").read_bytes()
    metadata = read_metadata(folder)
    fqn, item = next((k, v) for k, v in metadata.state_dict_metadata.items() if len(v.size) == 1)
    outside = ChunkStorageMetadata(torch.Size([item.size[0]]), item.chunks[0].sizes)
    metadata.state_dict_metadata[fqn] = TensorStorageMetadata(item.properties, item.size, [outside])
    write_metadata(folder, metadata)
    with pytest.raises(CheckpointError, match=f"gives {fqn} a chunk outside its shape"):
        checkpoint.load(folder)

    (folder / ".metadata").write_bytes(pristine)
    metadata = read_metadata(folder)
    key, info = first_record(metadata)
    size = (folder / info.relative_path).stat().st_size
    metadata.storage_data[key] = _StorageInfo(info.relative_path, size, info.length)
    write_metadata(folder, metadata)
    with pytest.raises(CheckpointError, match=r"holds \d+ bytes, but .metadata stores chunks up to byte"):
        checkpoint.load(folder)


# ---- item 8: damaged data files ---------------------------------------------------------------------------


def _truncate(folder: Path) -> None:
    data = folder / "__0_0.distcp"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _scramble(folder: Path) -> None:
    """The same size, the start of every stored record zeroed (bad sectors): only reading finds it."""
    data = folder / "__0_0.distcp"
    raw = bytearray(data.read_bytes())
    for info in read_metadata(folder).storage_data.values():
        raw[info.offset : info.offset + 64] = bytes(64)
    data.write_bytes(bytes(raw))


def _remove(folder: Path) -> None:
    (folder / "__0_0.distcp").unlink()


@pytest.mark.parametrize("damage", [_truncate, _scramble, _remove], ids=["truncated", "scrambled", "missing"])
def test_a_damaged_newest_sharded_checkpoint_is_named_and_the_older_one_offered(run_copy, embedded_data, damage):
    broken, good = newest(run_copy), run_copy / "checkpoints" / "step_00000001.dcp"
    damage(broken)
    with pytest.raises(CheckpointError, match=rf"cannot load checkpoint {broken}: .*resume from it with "
                                              rf"train.resume={good}"):
        train(stage_config(1, embedded_data, run_copy, *SHARDED, "train.max_steps=3"))


@pytest.mark.parametrize("damage", [_truncate, _scramble], ids=["truncated", "scrambled"])
def test_consolidate_and_init_from_name_a_damaged_folder_in_one_line(run_copy, embedded_data, tmp_path, damage):
    broken = newest(run_copy)
    damage(broken)
    proc = subprocess.run([sys.executable, "-m", "trainer.consolidate", str(broken), "--out", str(tmp_path / "c.pt")],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    assert f"cannot load checkpoint {broken}" in proc.stderr
    with pytest.raises(CheckpointError, match=f"cannot load checkpoint {broken}"):
        train(stage_config(1, embedded_data, tmp_path / "next", "device=cpu", f"train.init_from={broken}",
                           "train.max_steps=1", "train.eval_batches=0"))


def test_consolidate_checks_its_out_path_before_reading(sharded_run, tmp_path, capsys):
    from trainer.consolidate import main

    for out in (tmp_path, tmp_path / "no" / "such" / "c.pt"):
        assert main([str(sharded_run), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err
        assert f"--out {out}:" in err and len(err.strip().splitlines()) == 1, err
