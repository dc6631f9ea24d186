"""What every train_stageN.py runs inside @hydra.main: the stage, with user errors as one clear line.

A user error (a wrong key value, a missing file, a checkpoint that does not fit: trainer/errors.py,
data.shards.ShardError, trainer.checkpoint.CheckpointError) is logged as one ERROR line (console and the run's
log file) and the process exits with status 2; the message names the key and what is expected. Anything else is
a bug and keeps its full traceback.
"""

import logging

from omegaconf import DictConfig

log = logging.getLogger("trainer")


def user_errors() -> tuple[type[BaseException], ...]:
    from data.shards import ShardError
    from trainer.checkpoint import CheckpointError
    from trainer.errors import UserError

    return UserError, ShardError, CheckpointError


def run_stage(cfg: DictConfig) -> dict:
    """train(cfg), exiting with a one-line message on a user error (imported lazily: --help stays fast)."""
    from trainer.loop import train

    try:
        return train(cfg)
    except user_errors() as err:
        log.error("%s", err)  # Hydra's handlers: the console and out_dir/train_stageN.log
        raise SystemExit(2) from None
