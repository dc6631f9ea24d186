"""Stage 1: class-conditional pretraining of the ccDiT.

    python train_stage1.py experiment=embedded           # the offline demo, a few minutes on a CPU
    python train_stage1.py train.batch_size=64 ...       # any config key can be overridden
"""

from trainer.cli import stage_main

main = stage_main("stage1", __doc__)

if __name__ == "__main__":
    main()
