"""Stage 4: 512 px (64x64 latents, interpolated positions).

    python train_stage4.py [key=value ...]
"""

from trainer.cli import stage_main

main = stage_main("stage4", __doc__)

if __name__ == "__main__":
    main()
