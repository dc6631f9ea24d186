r"""Carry weights between curriculum stages and between layouts. Subcommands:

  stage1-to-stage2    class-conditional ccDiT -> text-conditional mmDiT (Stage 1 -> Stage 2)
  change-resolution   the same network at another input size, positions interpolated (e.g. Stage 3 -> Stage 4)
  to-torch            Transformer Engine (te.Linear) checkpoint -> plain nn.Linear layout
  to-te               nn.Linear checkpoint -> te.Linear layout

Each has an importable pure function (`ccdit_to_mmdit`, `change_resolution`, `te_to_torch_state`,
`torch_to_te_state`); the CLI only loads (core.checkpoint.load), converts the `model` and `ema` state
dicts, updates the metadata and saves atomically (core.checkpoint.save_atomic).

What the last three carry: `model` and `ema`, converted, whichever are present; every other entry
(optimizer, scheduler, step, RNG, history, config) as it is. The optimizer state stays valid because none
of them renames, reshapes or reorders a parameter: a resolution change touches no parameter, and te.Linear
registers `weight` and `bias` under nn.Linear's names, shapes and order. (stage1-to-stage2 writes weights
only: its parameters differ.) A new stage that restarts its schedule reads only `model`/`ema`.

Stage 1 -> Stage 2 (class-conditional ccDiT -> text-conditional mmDiT), the re-parameterization of
PixArt-alpha [chen2023pixartalpha] done completely:

* every tensor the two models share (patch embedding, self-attention with its QK-norms, MLP, final
  layer) is copied; the reference copied only the adaLN parts and lost the trunk;
* adaLN-single s(t) is block 0's modulation MLP with the null-class embedding baked into its first
  bias, so s(t) = S_0(t, null) for every t: W1 (t_emb + e_null) + b1 = W1 t_emb + (W1 e_null + b1);
* block i's embedding is E_i = S_i(t*, null) - S_0(t*, null), exact at t = t* and an approximation
  elsewhere; the final layer bakes e_null into its first bias the same way (exact for every t);
* cross-attention is new, with a zero output projection, so the caption changes nothing at first.

    python reparameterize.py stage1-to-stage2 --src outputs/stage1/checkpoints/step_00300000.pt \
        --dst outputs/stage2/init.pt --text-dim 2048 --text-len 120 [--t-star 0.5] [--weights ema]

Resolution change (PixArt-alpha's 256 -> 512 px step): no parameter depends on the input size, so every
tensor is carried unchanged; only `input_size` changes while `base_grid` is kept, so a 64x64 latent grid
steps positions by 1/2 and spans the range the model learned at 32x32 (interpolation, not extrapolation).

    python reparameterize.py change-resolution --src outputs/stage3/checkpoints/step_00100000.pt \
        --dst outputs/stage4/init.pt --input-size 64 [--stage 4]

Patch change (the embedded Stages 4-5 in pixel space, which grow the patch with the image and keep the token grid):
no subcommand; a stage whose model.patch differs from its train.init_from checkpoint's gets the weights through
models/conversion.py:change_patch when it loads them (trainer/builders.py), since the optimizer state would not fit.

Linear layouts: te.Linear and nn.Linear name and shape `weight` and `bias` alike; te.Linear adds an
`<layer>._extra_state` entry (FP8 scaling metadata) that a plain model rejects.

    python reparameterize.py to-torch --src fp8_run/step_00001000.pt --dst plain/step_00001000.pt
    python reparameterize.py to-te --src plain/step_00001000.pt --dst fp8_run/step_00001000.pt

Every subcommand refuses, before it loads anything: a --dst that is the --src file (by resolved path, through
symbolic and hard links), even with --force, since that would destroy a training checkpoint; an existing
--dst unless --force; an argument out of range (an --input-size the patch does not tile once the checkpoint
is read). It writes nothing when a tensor of the result holds NaN or Inf (naming it), and leaves no temporary
file behind when the write fails.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.cli_help import HelpFormatter

if TYPE_CHECKING:  # torch and models load inside the functions, so `--help` answers without them
    from torch import Tensor

    from models import ModelConfig

log = logging.getLogger(__name__)

_CONVERSIONS = ("stage2_config", "ccdit_to_mmdit", "parity", "resolution_config", "state_shapes",
                "check_same_parameter_shapes", "change_resolution", "te_to_torch_state", "torch_to_te_state",
                "load_state_allowing_missing_extra_state")


def __getattr__(name: str):
    """The conversions themselves (models/conversion.py: torch) load on first use, so --help answers at once."""
    if name in _CONVERSIONS:
        from models import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module 'reparameterize' has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------------
# CLI


def _unit_interval(text: str) -> float:
    """argparse type: a finite float in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also False for NaN
        raise argparse.ArgumentTypeError(f"must be a finite number in [0, 1], got {text!r}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def destination_problem(src: Path, dst: Path, force: bool) -> str | None:
    """Why converting `src` into `dst` is refused (an argparse-style message naming the flag), or None."""
    if not src.exists():
        return f"argument --src: {src}: no such file"
    if not src.is_file():
        return f"argument --src: {src}: not a file"
    if dst.resolve() == src.resolve() or (dst.exists() and os.path.samefile(src, dst)):
        return (
            f"argument --dst: {dst} is the same file as --src {src}: writing it would destroy the source "
            "checkpoint (weights, optimizer, RNG and loader state); choose another --dst"
        )
    if dst.is_dir():
        return f"argument --dst: {dst} is a directory; give a file name, e.g. {dst / 'init.pt'}"
    if dst.exists() and not force:
        return f"argument --dst: {dst} exists; pass --force to overwrite it"
    return None


def _load(src: Path) -> dict:
    """The checkpoint at --src, or a one-line error naming the flag."""
    from core import checkpoint

    try:
        return checkpoint.load(src)
    except RuntimeError as err:  # checkpoint.CheckpointError: one line naming the file
        raise SystemExit(f"argument --src: {str(err).splitlines()[0]}") from err


def _model_config(meta: dict, src: Path) -> ModelConfig:
    from models import ModelConfig

    try:
        return ModelConfig(**meta["model"])
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--src {src}: metadata.model does not describe a model: {err}") from err


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a name like `optimizer['state'][0]['exp_avg']`."""
    from torch import Tensor

    if isinstance(obj, Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{name}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{name}[{i}]")


def non_finite_tensors(ckpt: dict) -> list[str]:
    """Names of the floating-point tensors of a checkpoint that hold NaN or Inf."""
    import torch

    bad = []
    for key, value in ckpt.items():
        for name, tensor in _tensors(value, key):
            if (tensor.is_floating_point() or tensor.is_complex()) and not torch.isfinite(tensor).all():
                bad.append(name)
    return bad


def _refuse_non_finite(ckpt: dict, dst: Path) -> None:
    if bad := non_finite_tensors(ckpt):
        raise SystemExit(
            f"refusing to write {dst}: {len(bad)} tensors hold NaN or Inf ({', '.join(bad[:5])}"
            f"{', ...' if len(bad) > 5 else ''}); check the source checkpoint"
        )


def _save(ckpt: dict, dst: Path) -> None:
    """core.checkpoint.save_atomic (which removes its temporary file when the write fails), after checking
    that every tensor is finite; a failed write is one line."""
    from core import checkpoint

    _refuse_non_finite(ckpt, dst)
    try:
        checkpoint.save_atomic(ckpt, dst)
    except OSError as err:
        raise SystemExit(f"argument --dst: {err.strerror or err}") from err
    print(f"wrote {dst}")


def _stage1_to_stage2(args: argparse.Namespace) -> None:
    from core import checkpoint
    from models import build_model
    from models.conversion import ccdit_to_mmdit, parity, stage2_config

    state = _load(args.src)
    meta = state.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or meta["model"].get("family") != "ccdit":
        raise SystemExit(f"{args.src}: not a Stage-1 ccDiT checkpoint (metadata.model.family != 'ccdit')")
    cc_cfg = _model_config(state["metadata"], args.src)
    mm_cfg = stage2_config(cc_cfg, args.text_dim, args.text_len) if args.family == "mmdit" else _pixart_config(
        cc_cfg, args.text_dim, args.text_len)
    weights = checkpoint.WEIGHTS[args.weights]
    if not isinstance(state.get(weights), dict):
        raise SystemExit(f"--weights {args.weights}: {args.src} has no '{weights}' state dict")
    cc_state = checkpoint.model_weights(state, args.weights)  # the plain layout, also of an FP8-trained run
    _refuse_non_finite({weights: cc_state}, args.dst)  # before the parity check prints NaN for every t
    # The tensors new in Stage 2 (cross-attention, the null token) start from a fresh initialisation: seeded, so the
    # init file is a function of --src and the flags alone (it used to follow whatever the process had drawn before).
    import torch

    torch.manual_seed(args.seed)
    if args.family == "pixart":
        from models.conversion import ccdit_to_pixart

        mm_state, inexact = ccdit_to_pixart(cc_state, cc_cfg, mm_cfg, build_model(mm_cfg).state_dict(), args.t_star)
        print("carried over inexactly (pixart cannot hold them as they are): " + ("; ".join(inexact) or "nothing"))
    else:
        mm_state = ccdit_to_mmdit(cc_state, cc_cfg, mm_cfg, build_model(mm_cfg).state_dict(), args.t_star)

    cc_model, mm_model = build_model(cc_cfg).eval(), build_model(mm_cfg).eval()
    cc_model.load_state_dict(cc_state)
    mm_model.load_state_dict(mm_state)
    ts = sorted({0.0, 0.25, args.t_star, 0.75, 1.0})
    for t, diff in parity(cc_model, mm_model, ts).items():
        mark = "  (t*)" if t == args.t_star else ""
        print(f"max |{mm_cfg.name}(any caption) - ccDiT(null class)| at t={t:.2f}: {diff:.3e}{mark}")

    metadata = dict(state["metadata"], model=mm_cfg.to_dict(), stage=2, reparameterized_from=str(args.src))
    _save(dict(model=mm_state, ema=mm_state, step=0, metadata=metadata), args.dst)


def _pixart_config(cc, text_dim: int, text_len: int):
    """The stock-PixArt model (models/pixart.py) of a ccDiT's trunk: same width, depth, heads, patch and grid."""
    from models import model_config

    return model_config(family="pixart", size=cc.size, patch=cc.patch, dim=cc.dim, depth=cc.depth, heads=cc.heads,
                        in_channels=cc.in_channels, input_size=cc.input_size, base_grid=cc.base_grid,
                        mlp_ratio=cc.mlp_ratio, text_dim=text_dim, text_len=text_len)


def _convert_weights(ckpt: dict, fn: Callable[[dict[str, Tensor]], dict[str, Tensor]], src: Path) -> dict:
    """A copy of the checkpoint with `fn` applied to its `model` and `ema` state dicts, whichever exist.
    Every other entry (optimizer, scheduler, step, RNG, history, config) is carried as it is."""
    present = [k for k in ("model", "ema") if isinstance(ckpt.get(k), dict)]
    if not present:
        raise SystemExit(f"{src}: no 'model' or 'ema' state dict; not a checkpoint written by this repository")
    return dict(ckpt, **{k: fn(ckpt[k]) for k in present})


def _change_resolution(args: argparse.Namespace) -> None:
    """Optimizer and scheduler state are kept: Adam's moments are per parameter and no parameter changes,
    so the resolution step may continue the same run (pass train.resume=<this file>). A new stage that
    restarts its schedule loads only `model`/`ema` and ignores them."""
    from models.conversion import change_resolution, resolution_config

    ckpt = _load(args.src)
    meta = ckpt.get("metadata")
    if not isinstance(meta, dict) or "model" not in meta:
        raise SystemExit(f"{args.src}: no metadata.model; not a checkpoint written by this repository's trainer")
    old = _model_config(meta, args.src)
    try:
        new = resolution_config(old, args.input_size)
    except ValueError as err:
        raise SystemExit(f"--input-size {args.input_size}: {err}") from err
    try:
        out = _convert_weights(ckpt, lambda s: change_resolution(s, old, args.input_size)[1], args.src)
    except ValueError as err:
        raise SystemExit(f"{args.src}: {err}") from err
    metadata = dict(
        meta, model=new.to_dict(), resolution_changed_from=dict(input_size=old.input_size, checkpoint=str(args.src))
    )
    if args.stage is not None:
        metadata["stage"] = args.stage
    out["metadata"] = metadata
    g_old, g_new = old.input_size // old.patch, new.input_size // new.patch
    print(
        f"{old.name}: input {old.input_size} -> {new.input_size} ({g_old}x{g_old} -> {g_new}x{g_new} tokens), "
        f"base_grid {new.base_grid} kept: position step {new.base_grid / g_old:g} -> {new.base_grid / g_new:g}"
    )
    _save(out, args.dst)


def _to_torch(args: argparse.Namespace) -> None:
    """Optimizer state is kept: te.Linear registers `weight` and `bias` in nn.Linear's order, so the
    optimizer's per-parameter entries (indexed by position) still line up."""
    from models.conversion import te_to_torch_state

    ckpt = _load(args.src)
    dropped = []

    def convert(state: dict[str, Tensor]) -> dict[str, Tensor]:
        out = te_to_torch_state(state)
        dropped.append(len(state) - len(out))
        return out

    out = _convert_weights(ckpt, convert, args.src)
    if isinstance(out.get("metadata"), dict):
        out["metadata"] = dict(out["metadata"], linear_layout="torch")
    print(f"dropped {sum(dropped)} _extra_state entries (model and ema together)")
    _save(out, args.dst)


def _to_te(args: argparse.Namespace) -> None:
    """Optimizer state is kept, as for to-torch. Where TE and a GPU are present the `_extra_state` entries
    come from a converted model and the result loads strictly; elsewhere the weights are written unchanged
    and TE fills `_extra_state` when the trainer loads them with load_state_allowing_missing_extra_state."""
    from core.checkpoint import is_extra_state_key
    from models import build_model
    from models.conversion import torch_to_te_state
    from models.linear import convert_linears, te_unavailable_reason

    ckpt = _load(args.src)
    meta = ckpt.get("metadata")
    reason = te_unavailable_reason("cuda")
    te_model = None
    if reason is None and isinstance(meta, dict) and "model" in meta:
        te_model = build_model(_model_config(meta, args.src)).cuda()
        convert_linears(te_model, "fp8", "cuda")
    elif reason is None:
        reason = "the checkpoint has no metadata.model to build the TE model from"
    out = _convert_weights(ckpt, lambda s: torch_to_te_state(s, te_model), args.src)
    if isinstance(meta, dict):
        out["metadata"] = dict(meta, linear_layout="te")
    if te_model is None:
        print(
            f"weights written unchanged ({reason}); TE fills _extra_state on load "
            "(reparameterize.load_state_allowing_missing_extra_state)"
        )
    else:
        n = sum(is_extra_state_key(k) for k in out.get("model", out.get("ema", {})))
        print(f"added _extra_state entries from a converted model: {n} per state dict")
    _save(out, args.dst)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s12 = sub.add_parser("stage1-to-stage2", help="ccDiT checkpoint -> mmDiT initialisation")
    s12.add_argument("--src", type=Path, required=True, help="Stage-1 checkpoint (.pt)")
    s12.add_argument("--dst", type=Path, required=True, help="where to write the Stage-2 initialisation")
    s12.add_argument("--text-dim", type=_positive_int, required=True, help="hidden width of the Stage-2 text encoder")
    s12.add_argument("--text-len", type=_positive_int, default=120, help="tokens per caption")
    s12.add_argument(
        "--t-star", type=_unit_interval, default=0.5, help="time in [0, 1] at which block embeddings are exact"
    )
    s12.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which Stage-1 weights to carry")
    s12.add_argument("--seed", type=int, default=0, help="seed of the fresh cross-attention and null-token weights")
    s12.add_argument("--family", choices=("mmdit", "pixart"), default="mmdit",
                     help="the Stage-2 model: this repo's mmDiT (exact at t*) or the stock-PixArt flavour "
                          "(model=pixart; what it cannot hold exactly is printed)")
    s12.set_defaults(run=_stage1_to_stage2)

    res = sub.add_parser("change-resolution", help="carry a checkpoint to another input size (base_grid kept)")
    res.add_argument("--src", type=Path, required=True, help="checkpoint (.pt) with metadata.model")
    res.add_argument("--dst", type=Path, required=True, help="where to write the checkpoint at the new size")
    res.add_argument(
        "--input-size", type=_positive_int, required=True,
        help="new input side (latent pixels), a multiple of the patch size, e.g. 64",
    )
    res.add_argument("--stage", type=_positive_int, default=None, help="curriculum stage to record in the metadata")
    res.set_defaults(run=_change_resolution)

    layouts = []
    for name, run, text in (
        ("to-torch", _to_torch, "te.Linear layout -> nn.Linear layout"),
        ("to-te", _to_te, "nn.Linear layout -> te.Linear layout"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--src", type=Path, required=True, help="checkpoint (.pt)")
        p.add_argument("--dst", type=Path, required=True, help="where to write the converted checkpoint")
        p.set_defaults(run=run)
        layouts.append(p)

    for p in (s12, res, *layouts):
        p.add_argument("--force", action="store_true", help="overwrite --dst if it exists (never the --src file)")
        p.set_defaults(parser=p)
    args = parser.parse_args(argv)
    if problem := destination_problem(args.src, args.dst, args.force):
        args.parser.error(problem)
    args.run(args)


if __name__ == "__main__":
    main()
