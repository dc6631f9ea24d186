"""A sharded checkpoint as one file: what a DDP run would have saved at that step, core/checkpoint.py's format.

    python -m trainer.consolidate RUN_DIR --out FILE [--weights-only] [--force]

RUN_DIR is a run's out_dir, its checkpoints/ folder (then its newest checkpoint) or one step_XXXXXXXX.dcp folder.
The file holds the whole `model` and `ema` weights (plain nn.Linear layout, te.Linear's scaling state under
`te_extra_state`), the optimizer numbered by index as torch.optim saves it, the scheduler, step, history, rank
0's loader and RNG states, config and metadata: reparameterize.py, app/sample.py, the Gradio app, the evaluation
and the export read it with no other flag, and train.resume takes it. `--weights-only` leaves out the optimizer
(a third of the size; enough for every tool but a resume). Runs in one process on the CPU, no process group: every
tensor is read whole (core/sharded_checkpoint.py: read_full), so it needs host memory for what it writes.
"""

import argparse
import sys
from pathlib import Path

from core import checkpoint
from core.cli_help import HelpFormatter
from core.sharded_checkpoint import TENSOR_KEYS, open_sharded, read_full
from trainer.checkpoint import optimizer_by_index


def consolidate(src: Path, weights_only: bool = False) -> dict:
    """The single-file checkpoint dict of sharded checkpoint `src` (a step_XXXXXXXX.dcp folder)."""
    opened = open_sharded(Path(src))
    tensors = read_full(Path(src), ("model", "ema") if weights_only else TENSOR_KEYS)
    state = {k: v for k, v in opened.items() if k not in (*TENSOR_KEYS, "optimizer_groups", "world_size", "parallel")}
    state |= dict(model=tensors["model"], ema=tensors["ema"])
    if not weights_only:
        named = dict(state=tensors.get("optimizer", {}), param_groups=opened["optimizer_groups"])
        state["optimizer"] = optimizer_by_index(named)
    else:
        state.pop("scheduler", None)
    return state


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainer.consolidate", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("run", type=Path, help="a run's out_dir, its checkpoints/ folder, or a step_*.dcp folder")
    parser.add_argument("--out", type=Path, required=True, help="the .pt file to write (atomically)")
    parser.add_argument("--weights-only", action="store_true", help="model, EMA, metadata and config only")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        src = checkpoint.resolve(args.run, "RUN_DIR")
    except FileNotFoundError as err:
        print(f"trainer.consolidate: {err}", file=sys.stderr)
        return 2
    if not checkpoint.is_sharded(src):
        print(f"trainer.consolidate: {src} is already a single-file checkpoint", file=sys.stderr)
        return 2
    if args.out.exists() and not args.force:
        print(f"trainer.consolidate: --out {args.out} exists (--force replaces it)", file=sys.stderr)
        return 2
    if args.out.is_dir() or not args.out.absolute().parent.is_dir():
        what = "a folder" if args.out.is_dir() else "its folder does not exist"
        print(f"trainer.consolidate: --out {args.out}: {what}; give a .pt file in an existing folder", file=sys.stderr)
        return 2
    try:
        state = consolidate(src, args.weights_only)
        checkpoint.save_atomic(state, args.out)
    except checkpoint.CheckpointError as err:
        print(f"trainer.consolidate: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, no permission: the atomic write left nothing behind
        print(f"trainer.consolidate: --out {args.out}: cannot write it ({err.strerror or err}); nothing was "
              "written", file=sys.stderr)
        return 2
    print(f"{src} -> {args.out} (step {state['step']}{', weights only' if args.weights_only else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
