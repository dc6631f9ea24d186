"""Stage 3: high-quality / aesthetic fine-tune at 256 px.

    python train_stage3.py [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import run_stage


@hydra.main(config_path="configs", config_name="stage3", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
