"""Stage 5: 1024 px.

    python train_stage5.py [key=value ...]
"""

from trainer.cli import stage_main

main = stage_main("stage5", __doc__)

if __name__ == "__main__":
    main()
