"""Stage 2: text-image alignment. mmDiT initialised from Stage 1's EMA by reparameterize.py, 256 px, dense captions.

    python train_stage2.py [key=value ...]
"""

import hydra
from omegaconf import DictConfig

from trainer.cli import run_stage


@hydra.main(config_path="configs", config_name="stage2", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_stage(cfg)


if __name__ == "__main__":
    main()
