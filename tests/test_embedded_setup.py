"""What a new user runs first: `make data` builds what every embedded stage reads; the embedded experiment trains with
every model family; the seed's command shape (`train_stage1.py data=stage1 model=ccdit`) works; `starts_from` says
which stage train.init_from must hold (and is where the default init_from points)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from core import checkpoint
from tests.stages import CONFIGS, ROOT
from trainer.errors import ConfigError
from trainer.loop import train

SMALL = ["model.overrides.dim=32", "model.overrides.depth=2", "model.overrides.heads=2", "train.batch_size=8",
         "train.log_every=1", "train.sample_every=1000", "train.eval_batches=1", "train.preview.rows=1",
         "train.preview.steps=2", "train.num_threads=1", "optim.warmup_steps=1", "train.max_steps=2",
         "train.ckpt_every=2"]
"""The embedded experiment shrunk to two steps of a 2-block model, its own cond_dim left as the overlay sets it."""
FAMILIES = [(1, "ccdit")] + [(stage, family) for stage in (2, 4)
                             for family in ("mmdit", "jointdit", "pixart", "pixeldit", "mmpixeldit")]


def compose_stage(stage: int, *overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=f"stage{stage}", overrides=list(overrides))


def embedded(stage: int, data: Path, out: Path, *overrides: str):
    return compose_stage(stage, "experiment=embedded", f"embedded_data={data}", f"train.out_dir={out}", *SMALL,
                         *overrides)


@pytest.mark.slow
@pytest.mark.parametrize("stage, family", FAMILIES, ids=[f"stage{s}-{f}" for s, f in FAMILIES])
def test_every_family_trains_the_embedded_experiment(embedded_data, tmp_path, stage, family):
    """Stage 2 on the 32 px captions (tokens, encoder online) and Stage 4 on the 40 px buckets (stored features),
    from scratch, with the overlay's own settings: a pixart model keeps diffusers' 256-wide time embedding."""
    cfg = embedded(stage, embedded_data, tmp_path, f"model={family}", "train.init_from=null")
    summary = train(cfg)
    assert summary["steps"] == 2 and torch.isfinite(torch.tensor(summary["held_loss_end_ema"]))
    meta = checkpoint.load(Path(summary["checkpoint"]))["metadata"]
    assert meta["model"]["family"] == family and meta["model"]["dim"] == 32
    assert meta["model"]["cond_dim"] == (256 if family == "pixart" else 128)


@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_data_stage_n_names_the_stages_own_dataset(stage):
    for extra in ([], ["experiment=embedded"]):
        assert compose_stage(stage, f"data=stage{stage}", *extra).data == compose_stage(stage, *extra).data


def test_configs_have_no_unused_top_level_config():
    """The top-level config that was Stage 5 under another name was composed by no entrypoint: removed."""
    assert not (ROOT / "configs" / "config.yaml").exists()
    assert sorted(p.stem for p in (ROOT / "configs").glob("*.yaml")) == ["base", *(f"stage{n}" for n in range(1, 6))]


def test_the_seed_command_shape_trains(embedded_data, tmp_path):
    """`train_stage1.py data=stage1 model=ccdit` (with the embedded data and a tiny size) from the command line."""
    env = os.environ | dict(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    out = tmp_path / "run"
    cmd = [sys.executable, "train_stage1.py", "data=stage1", "model=ccdit", "experiment=embedded",
           f"embedded_data={embedded_data}", f"train.out_dir={out}", *SMALL]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checkpoint.load(checkpoint.newest(out))["step"] == 2


def test_default_init_from_follows_starts_from(tmp_path):
    for stage in (3, 4, 5):
        cfg = compose_stage(stage, f"runs_dir={tmp_path}")
        assert cfg.starts_from == stage - 1 and cfg.train.init_from == f"{tmp_path}/stage{stage - 1}"
    assert compose_stage(4, f"runs_dir={tmp_path}", "starts_from=2").train.init_from == f"{tmp_path}/stage2"


def test_init_from_must_hold_the_stage_starts_from_names(embedded_data, tmp_path):
    stage1 = train(embedded(1, embedded_data, tmp_path / "s1"))["checkpoint"]
    stage2 = train(embedded(2, embedded_data, tmp_path / "s2", "train.init_from=null"))["checkpoint"]
    with pytest.raises(ConfigError, match=r"holds Stage 1 weights, but Stage 3 starts from Stage 2 \(starts_from=2\)"):
        train(embedded(3, embedded_data, tmp_path / "s3", f"train.init_from={stage1}"))
    with pytest.raises(ConfigError, match=r"holds Stage 2 weights, but Stage 5 starts from Stage 4"):
        train(embedded(5, embedded_data, tmp_path / "s5", f"train.init_from={stage2}", "train.max_steps=1"))
    # Stage 3 from Stage 2 (what starts_from names), and Stage 5 from Stage 2 once the user says so.
    assert train(embedded(3, embedded_data, tmp_path / "s3", f"train.init_from={stage2}"))["steps"] == 2
    assert train(embedded(5, embedded_data, tmp_path / "s5b", f"train.init_from={stage2}", "starts_from=2",
                          "train.max_steps=1"))["steps"] == 1


def test_the_missing_data_hint_names_make_data(tmp_path):
    from trainer.builders import read_data_spec
    from trainer.errors import MissingInputError

    with pytest.raises(MissingInputError, match="make data"):
        read_data_spec(compose_stage(4, "experiment=embedded", f"embedded_data={tmp_path}/outputs/data"))


@pytest.mark.slow
def test_make_data_builds_what_every_embedded_stage_reads(tmp_path):
    """The Makefile's data target runs scripts/tools/build_embedded_data.sh with no environment; run here with fewer
    scenes, every embedded stage's data.path then holds a dataset its trainer takes (tokenizer, VAE, features)."""
    from trainer import builders

    recipe = (ROOT / "Makefile").read_text().split("\ndata:", 1)[1].split("\n\n", 1)[0]
    assert recipe.strip().splitlines()[-1].strip() == "scripts/tools/build_embedded_data.sh outputs/data"
    env = {k: v for k, v in os.environ.items() if k not in ("DATASETS", "SIZES", "KINDS", "BUCKETED")}
    env |= dict(SYNTHETIC_SAMPLES="48", BUCKETED_SAMPLES="24", PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["scripts/tools/build_embedded_data.sh", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/shards-*"))
    assert built == ["synthetic-32/shards-labels", "synthetic-32/shards-text", "synthetic-40-buckets/shards-text",
                     "synthetic-48-buckets/shards-text"]
    mixes = {p.parent.relative_to(tmp_path).as_posix(): json.loads(p.read_text())["mix_name"]
             for p in tmp_path.glob("*/tars*/dataset.json")}
    assert mixes == {"synthetic-32/tars-objects": "objects", "synthetic-32/tars-captions": "captions",
                     "synthetic-40-buckets/tars": "captions", "synthetic-48-buckets/tars": "captions"}
    for stage in range(1, 6):
        cfg = compose_stage(stage, "experiment=embedded", f"embedded_data={tmp_path}")
        spec = builders.read_data_spec(cfg)
        builders.check_vae(cfg, spec, cfg.data.path)
        if spec.kind == "text":
            builders.configured_tokenizer(cfg, spec)
            assert builders.uses_text_features(cfg, spec)  # every caption stage reads stored states


def test_a_value_the_family_cannot_take_is_one_error_line(embedded_data, tmp_path):
    """model=pixart with another cond_dim by hand: a ConfigError (one ERROR line, exit 2), naming the key."""
    cfg = embedded(2, embedded_data, tmp_path, "model=pixart", "train.init_from=null", "model.overrides.cond_dim=128")
    with pytest.raises(ConfigError, match=r"model=pixart: model.overrides.cond_dim=128: .* needs cond_dim=256"):
        train(cfg)
