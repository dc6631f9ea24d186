"""The one training loop behind every train_stageN.py, and its parts (EMA, optimiser, checkpoints)."""
