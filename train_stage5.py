"""Stage 5: 1024 px.

    python train_stage5.py [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import run_stage


@hydra.main(config_path="configs", config_name="stage5", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
