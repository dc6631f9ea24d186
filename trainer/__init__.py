"""The one training loop behind every train_stageN.py, and its parts (EMA, optimiser, checkpoints).

Importing the package registers the config schema (trainer/config.py) with Hydra, so every composition of
configs/ (the entrypoints, python -m planner, the tests) is typed."""

from trainer import config as _config  # noqa: F401 (registers the schema)
