"""README, "Fine-tune a published model": every command of that section, in order, on tiny local stand-ins: a
PixArt-Sigma-like pipeline in a fake Hub cache read with HF_HUB_OFFLINE=1 (no network), the embedded Stage-2 data,
the CPU. Where a real run needs the network or a GPU, the README says so; the commands are the same."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from core.checkpoint import load
from tests.test_import_weights import fake_hub_cache, pipeline_folder, stock_pixart

ROOT = Path(__file__).resolve().parents[1]
HUB_ID = "acme/tiny-pixart-sigma"  # stands for PixArt-alpha/PixArt-Sigma-XL-2-1024-MS


def run(*args: str, env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def test_from_a_hub_id_to_an_imported_checkpoint_a_fine_tune_a_grid_and_a_diffusers_folder(embedded_data, tmp_path):
    from tests.stages import stage_config
    from trainer.loop import train

    # A PixArt-Sigma in miniature: learn_sigma, the caption MLP, pixels in (the embedded data), MiniLM-wide captions.
    ref = stock_pixart(in_channels=3, out_channels=6, sample_size=32, patch_size=4, attention_head_dim=16,
                       cross_attention_dim=32, caption_channels=384)
    fake_hub_cache(tmp_path / "hub", HUB_ID, lambda folder: pipeline_folder(folder, ref))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))

    # 1. python -m app.import_weights HUB_ID --out runs/sigma/init.pt
    init = tmp_path / "runs" / "sigma" / "init.pt"
    out = run("-m", "app.import_weights", HUB_ID, "--out", str(init), env=env).stdout
    assert "predicts epsilon" in out and f"train.init_from={init} train.prediction=velocity" in out
    assert load(init)["metadata"]["imported"]["source"] == HUB_ID

    # 2. the fine-tune to velocity (train_stageN.py ... train.init_from=runs/sigma/init.pt train.prediction=velocity)
    cfg = stage_config(2, embedded_data, tmp_path / "runs" / "sigma-ft", "train.max_steps=2", f"train.init_from={init}",
                       "model=pixart", "model.overrides.cond_dim=256", "train.prediction=velocity")
    checkpoint = Path(train(cfg)["checkpoint"])
    meta = load(checkpoint)["metadata"]
    assert meta["prediction"] == "velocity" and meta["model"]["caption_projection"] is True

    # 3. a sampled grid: python -m app.sample --model-path runs/sigma-ft --prompt ... --out-dir samples
    run("-m", "app.sample", "--model-path", str(tmp_path / "runs" / "sigma-ft"), "--prompt", "a red circle",
        "--prompt", "a blue square", "--steps", "3", "--out-dir", str(tmp_path / "samples"), env=env)
    assert list((tmp_path / "samples").glob("*.png"))

    # 4. an exported diffusers folder whose transformer stock diffusers loads
    exported = tmp_path / "exported"
    run("-m", "app.export", "--model-path", str(tmp_path / "runs" / "sigma-ft"), "--out-dir", str(exported),
        "--format", "pixart", env=env)
    from diffusers import PixArtTransformer2DModel

    stock = PixArtTransformer2DModel.from_pretrained(exported, subfolder="transformer")
    assert stock.config.caption_channels == 384 and stock.config.out_channels == 3  # the variance half is gone
    card = (exported / "README.md").read_text()
    assert f"{init}" in card  # the lineage reaches the imported checkpoint
    assert torch.isfinite(next(stock.parameters())).all()
