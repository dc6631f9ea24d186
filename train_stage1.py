"""Stage 1: class-conditional pretraining of the ccDiT.

    python train_stage1.py experiment=embedded           # the offline demo, a few minutes on a CPU
    python train_stage1.py train.batch_size=64 ...       # any config key can be overridden
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import run_stage


@hydra.main(config_path="configs", config_name="stage1", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
