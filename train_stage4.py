"""Stage 4: 512 px (64x64 latents, interpolated positions).

    python train_stage4.py [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import run_stage


@hydra.main(config_path="configs", config_name="stage4", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
