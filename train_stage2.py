"""Stage 2: text-image alignment. mmDiT initialised from Stage 1's EMA by reparameterize.py, 256 px, dense captions.

    python train_stage2.py [key=value ...]
"""

from trainer.cli import stage_main

main = stage_main("stage2", __doc__)

if __name__ == "__main__":
    main()
