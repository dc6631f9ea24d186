"""Stage 3: high-quality / aesthetic fine-tune at 256 px.

    python train_stage3.py [key=value ...]
"""

from trainer.cli import stage_main

main = stage_main("stage3", __doc__)

if __name__ == "__main__":
    main()
