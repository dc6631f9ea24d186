"""The one checkpoint surface (core/checkpoint.py): files and sharded folders listed, resolved and pruned alike, one
"newest checkpoint of a run", and the metadata record the trainer writes read back as it was written."""

from pathlib import Path

import pytest

from core import checkpoint
from core.checkpoint import CheckpointError, CheckpointMetadata
from models import ModelConfig


def _run_folder(root: Path) -> Path:
    """A run's checkpoints/ with both forms, plus what is not a checkpoint: a sharded save still in progress, a
    temporary file, a file with a sharded name, another name."""
    ckpts = root / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("step_00000002.pt", "step_00000009.pt", ".step_00000012.pt.tmp-host-1", "step_00000013.dcp",
                 "notes.txt"):
        (ckpts / name).write_bytes(b"")
    for name in ("step_00000010.dcp", ".step_00000011.dcp.partial"):
        (ckpts / name).mkdir()
    return ckpts


def test_newest_is_the_highest_step_of_either_form(tmp_path):
    ckpts = _run_folder(tmp_path / "run")
    expected = ["step_00000002.pt", "step_00000009.pt", "step_00000010.dcp"]
    assert [p.name for p in checkpoint.list_checkpoints(ckpts)] == expected
    assert checkpoint.newest(tmp_path / "run") == checkpoint.newest(ckpts) == ckpts / "step_00000010.dcp"
    assert [checkpoint.step_of(p) for p in checkpoint.list_checkpoints(ckpts)] == [2, 9, 10]
    assert checkpoint.newest(tmp_path / "nothing") is None
    (ckpts / "step_00000010.pt").write_bytes(b"")  # the same step in both forms: the folder is the newer
    assert checkpoint.newest(ckpts) == ckpts / "step_00000010.dcp"


def test_a_tool_that_reads_single_files_is_told_to_consolidate_the_newest_sharded_one(tmp_path):
    """An older file beside a newer sharded folder is not taken silently: the newest is named, with the command."""
    run = tmp_path / "run"
    ckpts = _run_folder(run)
    assert checkpoint.resolve(run, "train.init_from") == ckpts / "step_00000010.dcp"
    with pytest.raises(CheckpointError, match=rf"--model-path {run}: step_00000010.dcp is a sharded checkpoint.*"
                                              rf"`python -m trainer.consolidate {run} --out FILE.pt`"):
        checkpoint.resolve(run, "--model-path", single_file=True)
    older = ckpts / "step_00000009.pt"
    assert checkpoint.resolve(older, "--model-path", single_file=True) == older
    with pytest.raises(FileNotFoundError, match=r"train.init_from='.*missing': no such file or folder"):
        checkpoint.resolve(tmp_path / "missing", "train.init_from")


def test_prune_keeps_the_newest_of_either_form_and_drops_dead_partials(tmp_path):
    ckpts = _run_folder(tmp_path / "run")
    checkpoint.prune(ckpts, keep=2)
    assert sorted(p.name for p in ckpts.iterdir()) == [".step_00000012.pt.tmp-host-1", "notes.txt",
                                                       "step_00000009.pt", "step_00000010.dcp", "step_00000013.dcp"]


def test_the_record_the_trainer_writes_is_the_one_its_readers_read(stage1_checkpoint):
    """The writer builds CheckpointMetadata; the stored dict carries the identity every checkpoint has carried at its
    top level (family, size, name), equal to what its model config says, and reads back to the same record."""
    meta = checkpoint.load(stage1_checkpoint)["metadata"]
    config = ModelConfig(**meta["model"])
    assert (meta["family"], meta["size"], meta["name"]) == (config.family, config.size, config.name)
    assert meta["conditioning"] == "class" and meta["num_classes"] == 4 and "tokenizer" not in meta
    record = CheckpointMetadata.from_dict(meta, str(stage1_checkpoint))
    assert record.to_dict() == meta and record.name == config.name
