"""What every train_stageN.py runs: its stage under Hydra, user errors as one clear line, and --help.

A user error (a wrong key value, a missing file, a checkpoint that does not fit: trainer/errors.py,
data.shards.ShardError, core.checkpoint.CheckpointError) is logged as one ERROR line (console and the run's
log file) and the process exits with status 2; the message names the key and what is expected. Anything else is
a bug and keeps its full traceback. A value of the wrong type never gets this far: the schema
(trainer/config.py) makes Hydra refuse the override, naming the key.

`python train_stageN.py --help` lists every key of the stage with its value there and its documentation (the
schema's docstrings); Hydra's own flags are under --hydra-help.
"""

import logging
import sys
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("trainer")


def user_errors() -> tuple[type[BaseException], ...]:
    from core.checkpoint import CheckpointError
    from data.shards import ShardError
    from trainer.errors import UserError

    return UserError, ShardError, CheckpointError


def run_stage(cfg) -> dict:
    """train(cfg), exiting with a one-line message on a user error (imported lazily: --help stays fast)."""
    from trainer.config import check_ranges
    from trainer.loop import train

    try:
        check_ranges(cfg)
        return train(cfg)
    except user_errors() as err:
        log.error("%s", err)  # Hydra's handlers: the console and out_dir/train_stageN.log
        raise SystemExit(2) from None


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
        import hydra

        hydra.main(config_path=str(CONFIGS), config_name=config_name, version_base="1.3")(run_stage)()

    return main
