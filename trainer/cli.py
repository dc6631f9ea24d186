"""What every train_stageN.py runs: its stage under Hydra, user errors as one clear line, and --help.

A user error (a wrong key value, a missing file, a checkpoint that does not fit: trainer/errors.py,
data.shards.ShardError, core.checkpoint.CheckpointError; a key the schema does not have, added with `+`; a full
disk while a checkpoint is written) is logged as one ERROR line (console and the run's log file) and the process
exits with status 2; the message names the key and what is expected. Anything else is a bug and keeps its full
traceback. A value of the wrong type never gets this far: the schema (trainer/config.py) makes Hydra refuse the
override, naming the key. train.out_dir is checked before Hydra creates it (a path below a file, in /proc, or
somewhere this process cannot write is one ERROR line too, as Hydra would otherwise fail with a traceback).

`python train_stageN.py --help` lists every key of the stage with its value there and its documentation (the
schema's docstrings); Hydra's own flags are under --hydra-help.
"""

import errno
import logging
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("trainer")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
"""Hydra's default job logging format: an error found before Hydra starts looks like one found after."""


def user_errors() -> tuple[type[BaseException], ...]:
    from core.checkpoint import CheckpointError
    from data.shards import ShardError
    from trainer.errors import UserError

    return UserError, ShardError, CheckpointError


def run_stage(cfg) -> dict:
    """train(cfg), exiting with a one-line message on a user error (imported lazily: --help stays fast)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from trainer.config import check_keys, check_ranges
    from trainer.loop import train

    try:
        check_keys(cfg)
        check_ranges(cfg)
        return train(cfg)
    except user_errors() as err:
        log.error("%s", err)  # Hydra's handlers: the console and out_dir/train_stageN.log
        raise SystemExit(2) from None
    except (OSError, CheckpointException) as err:
        full = disk_full(err)
        if full is None:
            raise
        log.error("%s; the checkpoints written before are intact: free space under %s and run again "
                  "(train.resume=auto continues from the newest)", full, cfg.train.out_dir)
        raise SystemExit(2) from None


def disk_full(err: BaseException) -> OSError | None:
    """The full-disk (or quota) OSError behind `err`: itself, what caused it, or one rank's failure inside DCP's
    CheckpointException (a sharded save); None for anything else."""
    seen: list[BaseException] = [err]
    while seen:
        current = seen.pop()
        if isinstance(current, OSError) and current.errno in DISK_FULL:
            return current
        seen += [e for e in (current.__cause__, current.__context__) if e is not None]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            seen += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]
    return None


def check_out_dir(config_name: str, args: list[str]) -> str | None:
    """The problem with the folder Hydra is about to create for this run (hydra.run.dir, train.out_dir unless
    overridden), or None; the folder is created here, as Hydra would. Left to Hydra when its own flags are given
    or the overrides do not compose (it reports those itself)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from core.writable import writable_folder

    if any(a.startswith("-") for a in args):
        return None
    try:
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=args, return_hydra_config=True)
        out_dir = str(cfg.hydra.run.dir)
    except (HydraException, OmegaConfBaseException, ValueError):
        return None
    try:
        writable_folder(out_dir, f"train.out_dir={out_dir}", create=True)
    except ValueError as err:
        return str(err)
    return None


def stage_help(config_name: str, overrides: list[str], intro: str) -> str:
    """The stage's documented keys, with their values as composed with `overrides`."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import field_docs

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    groups = {g: sorted(p.stem for p in (CONFIGS / g).glob("*.yaml"))
              for g in ("model", "data", "vae", "text_encoder", "precision", "wandb", "experiment")}
    lines = [intro.strip(), "", f"usage: python {Path(sys.argv[0]).name} [key=value ...]   (Hydra overrides; "
             "--hydra-help for Hydra's own flags)", "", "config groups (group=option):"]
    lines += [f"  {g}: {' | '.join(options)}" for g, options in groups.items()]
    lines += ["", "keys (the value in this stage, then what it is):"]
    for key, doc in field_docs().items():
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        value = None if OmegaConf.is_missing(node, leaf) else node[leaf]
        shown = "???" if OmegaConf.is_missing(node, leaf) else OmegaConf.to_container(value) if OmegaConf.is_config(
            value) else value
        lines.append(f"  {key} = {shown!r}".ljust(46) + f"  {doc}")
    return "\n".join(lines)


def stage_main(config_name: str, doc: str):
    """The entrypoint of a train_stageN.py: `--help` answers from the schema; anything else runs the stage."""

    def main() -> None:
        args = sys.argv[1:]
        if "--help" in args or "-h" in args:
            print(stage_help(config_name, [a for a in args if a not in ("--help", "-h")], doc))
            return
        problem = check_out_dir(config_name, args)
        if problem is not None:
            logging.basicConfig(format=LOG_FORMAT, level=logging.INFO)
            log.error("%s", problem)
            raise SystemExit(2)
        import hydra

        hydra.main(config_path=str(CONFIGS), config_name=config_name, version_base="1.3")(run_stage)()

    return main
