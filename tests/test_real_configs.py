"""The configs a researcher launches, run the way they launch them: `train_stageN.py` with the real stage config
and only what this CPU machine cannot have replaced — a debug-size model (patch 4), the embedded shards as data,
pixel space (vae=identity) instead of the SD3 VAE and the bundled MiniLM instead of T5Gemma (both need the Hub),
a batch of 4 and two steps. Everything else is as a user gets it: wandb in its default mode (offline without an
API key), the real precision config (bf16, which falls back to fp32 on a CPU), the real EMA, schedule,
checkpoint cadence, previews and held-out batches. The stages chain as the curriculum does (Stage 2 from
reparameterize.py's init of Stage 1, then each from the previous run folder). Each offline wandb run is read back:
its scalars and preview images must be there."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core import checkpoint
from tests.stages import ROOT
from tests.wandb_reader import offline_runs, read_offline_run
from trainer.loop import train

REAL = ["model.size=debug", "model.patch=4", "vae=identity", "train.max_steps=2"]
"""The only overrides: a small model, pixel space, two steps, and (stage_overrides) a tiny batch."""
ACCUM = {1: 2, 2: 20, 3: 4, 4: 8, 5: 8}
"""Each real stage's train.grad_accum (kept as configured: its memory plan): the tiny batch is 2 per micro-batch."""
DATA = {1: "synthetic-32/shards-labels", 2: "synthetic-32/shards-text", 3: "synthetic-32/shards-text",
        4: "synthetic-40/shards-text", 5: "synthetic-48/shards-text"}


def user_env(tmp_path: Path) -> dict:
    """A user's environment without a wandb login: no API key, a HOME without a netrc."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    return env | dict(HOME=str(home), OMP_NUM_THREADS="1")


def stage_overrides(stage: int, data: Path, out: Path, previous: str | None) -> list[str]:
    args = [f"data.path={data / DATA[stage]}", f"train.out_dir={out}", *REAL, f"train.batch_size={2 * ACCUM[stage]}"]
    if stage == 1:
        args.append("train.preview.labels=[0,1]")  # the real Stage 1 previews ImageNet classes; this set has 4
    else:
        args += ["text_encoder=minilm", f"train.init_from={previous}"]
    return args


def check_offline_run(out: Path) -> None:
    (run,) = offline_runs(out)
    logged = read_offline_run(run)
    assert logged["history"][2]["train/loss"] > 0 and logged["history"][2]["train/grad_norm"] > 0
    assert {"held/loss_end_ema", "train/lr", "train/img_per_s"} <= set(logged["history"][2])
    kinds = {Path(p).name.split("_")[0] for p in logged["images"]}
    assert kinds == {"ema", "raw"}, logged["images"]  # the final step's previews, EMA and raw weights


def check_run_folder(out: Path, stage: int) -> None:
    (ckpt,) = checkpoint.list_checkpoints(out / "checkpoints")
    state = checkpoint.load(ckpt)
    assert state["step"] == 2 and state["metadata"]["stage"] == stage
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2] and train_rows[0]["train/grad_norm"] > 0
    assert any("held/loss_end_ema" in r for r in rows)
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


@pytest.mark.slow
def test_every_real_stage_config_runs_two_steps_chained_from_the_command_line(embedded_data, tmp_path):
    env, previous = user_env(tmp_path), None
    for stage in range(1, 6):
        out = tmp_path / f"stage{stage}"
        if stage == 2:
            init = out / "init.pt"
            proc = subprocess.run(
                [sys.executable, "reparameterize.py", "stage1-to-stage2", "--src", previous, "--dst", str(init),
                 "--text-dim", "384", "--text-len", "32"], cwd=ROOT, env=env, capture_output=True, text=True,
                timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            previous = str(init)
        cmd = [sys.executable, f"train_stage{stage}.py", *stage_overrides(stage, embedded_data, out, previous)]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"stage {stage}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        log = (out / f"train_stage{stage}.log").read_text()
        assert "wandb offline" in log, log[-2000:]  # auto without a key: offline
        assert "this cpu run computes in fp32" in log  # the real precision config (bf16) falls back, and says so
        check_run_folder(out, stage)
        check_offline_run(out)
        previous = str(out) if stage > 1 else str(checkpoint.newest(out))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3, 4, 5])
def test_each_real_stage_with_wandb_offline_logs_scalars_and_images(embedded_data, tmp_path, stage, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    args = stage_overrides(stage, embedded_data, tmp_path, None)
    args = [a for a in args if not a.startswith("train.init_from")] + ["wandb=offline", "train.num_threads=1"]
    if stage > 1:
        args.append("train.init_from=null")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name=f"stage{stage}", overrides=args)
    assert cfg.wandb.mode == "offline" and cfg.precision.compute == "bf16" and cfg.train.grad_accum == ACCUM[stage]
    summary = train(cfg)
    assert summary["steps"] == 2
    check_run_folder(tmp_path, stage)
    check_offline_run(tmp_path)

