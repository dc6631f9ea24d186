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
  layer) is copied; the reference system copied only the adaLN parts and lost the trunk;
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

import argparse
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core import checkpoint
from models import ModelConfig, build_model
from models.embeddings import timestep_embedding

log = logging.getLogger(__name__)

# Shapes that must agree for the trunk to carry over.
_SHARED_FIELDS = ("dim", "depth", "heads", "patch", "in_channels", "mlp_ratio", "cond_dim", "time_scale", "qk_norm")


def stage2_config(cc: ModelConfig, text_dim: int, text_len: int) -> ModelConfig:
    """The mmDiT that a ccDiT becomes: same trunk, a text encoder instead of class labels."""
    return dataclasses.replace(cc, family="mmdit", conditioning="text", text_dim=text_dim, text_len=text_len)


def _modulation(state: dict[str, Tensor], prefix: str, cond: Tensor) -> Tensor:
    """W2 SiLU(W1 cond + b1) + b2 of the AdaLNModulation at `prefix`, in float64."""
    w1, b1 = state[f"{prefix}.fc1.weight"].double(), state[f"{prefix}.fc1.bias"].double()
    w2, b2 = state[f"{prefix}.fc2.weight"].double(), state[f"{prefix}.fc2.bias"].double()
    return F.linear(F.silu(F.linear(cond, w1, b1)), w2, b2)


@torch.no_grad()
def ccdit_to_mmdit(
    cc_state: dict[str, Tensor], cc: ModelConfig, mm: ModelConfig, mm_init: dict[str, Tensor], t_star: float = 0.5
) -> dict[str, Tensor]:
    """Pure function: Stage-1 state dict -> Stage-2 state dict. `mm_init` supplies the tensors that
    are new in Stage 2 (cross-attention, the null text token) from a freshly initialised mmDiT."""
    if cc.family != "ccdit" or mm.family != "mmdit":
        raise ValueError(f"expected ccdit -> mmdit, got {cc.family} -> {mm.family}")
    if not 0.0 <= t_star <= 1.0:  # also False for NaN
        raise ValueError(f"t_star must be a finite number in [0, 1] (the time of the exact match), got {t_star}")
    mismatched = [f for f in _SHARED_FIELDS if getattr(cc, f) != getattr(mm, f)]
    if mismatched:
        raise ValueError(f"ccDiT and mmDiT configs differ in {mismatched}; the trunk cannot carry over")

    out = dict(mm_init)
    for key in mm_init:  # the trunk: every tensor with the same name and shape in both models
        if key in cc_state and cc_state[key].shape == mm_init[key].shape and "adaLN" not in key:
            out[key] = cc_state[key].clone()

    e_null = cc_state["y_embed.table.weight"][cc.num_classes].double()  # the null class
    t_emb = timestep_embedding(torch.tensor([t_star * cc.time_scale]), cc.cond_dim).double()[0]

    def bake(prefix_src: str, prefix_dst: str) -> None:
        """Copy an AdaLNModulation, folding W1 e_null into its first bias."""
        w1 = cc_state[f"{prefix_src}.fc1.weight"]
        out[f"{prefix_dst}.fc1.weight"] = w1.clone()
        b1 = cc_state[f"{prefix_src}.fc1.bias"].double() + w1.double() @ e_null
        out[f"{prefix_dst}.fc1.bias"] = b1.to(w1.dtype)
        out[f"{prefix_dst}.fc2.weight"] = cc_state[f"{prefix_src}.fc2.weight"].clone()
        out[f"{prefix_dst}.fc2.bias"] = cc_state[f"{prefix_src}.fc2.bias"].clone()

    bake("blocks.0.adaLN", "t_block")
    bake("final.adaLN", "final.adaLN")
    s_bar = _modulation(cc_state, "blocks.0.adaLN", t_emb + e_null)
    for i in range(cc.depth):
        s_i = _modulation(cc_state, f"blocks.{i}.adaLN", t_emb + e_null)
        out[f"blocks.{i}.embedding"] = (s_i - s_bar).to(mm_init[f"blocks.{i}.embedding"].dtype)
        # New in Stage 2 and zero, so the caption has no effect until training opens it.
        out[f"blocks.{i}.cross_attn.proj.weight"] = torch.zeros_like(mm_init[f"blocks.{i}.cross_attn.proj.weight"])
        out[f"blocks.{i}.cross_attn.proj.bias"] = torch.zeros_like(mm_init[f"blocks.{i}.cross_attn.proj.bias"])
    return out


@torch.no_grad()
def parity(cc_model, mm_model, ts: list[float], seed: int = 0) -> dict[float, float]:
    """Largest |mmDiT(x, t, random caption) - ccDiT(x, t, null class)| at each t."""
    gen = torch.Generator().manual_seed(seed)
    cfg = mm_model.config
    x = torch.randn(2, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    text = torch.randn(2, cfg.text_len, cfg.text_dim, generator=gen)
    mask = torch.ones(2, cfg.text_len, dtype=torch.bool)
    null = torch.full((2,), cc_model.null_label)
    result = {}
    for t in ts:
        tt = torch.full((2,), t)
        result[t] = (mm_model(x, tt, text, mask) - cc_model(x, tt, labels=null)).abs().max().item()
    return result


# ---------------------------------------------------------------------------------------------------------
# Resolution change


def resolution_config(cfg: ModelConfig, input_size: int) -> ModelConfig:
    """The same network at another input size. `base_grid` is kept: the position embedding measures
    positions in base-grid units (index * base_grid / sqrt(grid_h * grid_w)), so a finer grid interpolates
    the positions learned at the old one instead of extrapolating to ones never seen [chen2023pixartalpha]."""
    if input_size <= 0 or input_size % cfg.patch:
        raise ValueError(
            f"input_size={input_size} must be a positive multiple of the patch size {cfg.patch} "
            f"(a {cfg.patch}x{cfg.patch} patch cannot tile a {input_size}x{input_size} input)"
        )
    return dataclasses.replace(cfg, input_size=input_size, base_grid=cfg.base_grid, extra=dict(cfg.extra))


def state_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Name -> shape of every tensor in the state dict of the model `cfg` describes. Built on the meta
    device, so an XL model costs no memory and no initialisation time."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_same_parameter_shapes(old: ModelConfig, new: ModelConfig) -> None:
    """Raise unless the two configs build state dicts with the same names and shapes."""
    a, b = state_shapes(old), state_shapes(new)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        detail = ", ".join(
            f"{k}: {tuple(a[k]) if k in a else None} -> {tuple(b[k]) if k in b else None}" for k in differ[:5]
        )
        raise ValueError(
            f"{len(differ)} tensors depend on the resolution ({detail}); a checkpoint cannot simply be carried "
            "to the new input size and those tensors would need resampling"
        )


def _check_state_matches(state: dict[str, Tensor], cfg: ModelConfig) -> None:
    """Raise unless `state` holds exactly the tensors of the model `cfg` describes (TE's `_extra_state`
    entries aside: they belong to the linear layout, not the architecture)."""
    expected = state_shapes(cfg)
    weights = {k: v for k, v in state.items() if not is_extra_state_key(k)}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if weights[k].shape != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"state dict does not match {cfg.name} (input_size {cfg.input_size}): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )


def change_resolution(
    state: dict[str, Tensor], cfg: ModelConfig, input_size: int
) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Pure function: (state dict, config) at one input size -> (config, state dict) at `input_size`.

    Every tensor is carried unchanged (the same tensor objects in a new dict: nothing about them changes).
    Raises ValueError when `input_size` does not tile into patches, when `state` does not match `cfg`, or
    when any tensor's shape would differ between the two models.
    """
    new = resolution_config(cfg, input_size)
    _check_state_matches(state, cfg)
    check_same_parameter_shapes(cfg, new)
    return new, dict(state)


# ---------------------------------------------------------------------------------------------------------
# nn.Linear <-> te.Linear layouts

EXTRA_STATE = "_extra_state"


def is_extra_state_key(key: str) -> bool:
    """True for the `_extra_state` entry that a module with get_extra_state (te.Linear) adds to a state dict."""
    return key == EXTRA_STATE or key.endswith("." + EXTRA_STATE)


def te_to_torch_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Pure function: te.Linear layout -> nn.Linear layout. Drops every `._extra_state` entry (FP8 scaling
    factors and amax history, meaningless without TE) and keeps every weight as it is; logs how many went."""
    out = {k: v for k, v in state.items() if not is_extra_state_key(k)}
    log.info("dropped %d _extra_state entries, kept %d tensors", len(state) - len(out), len(out))
    return out


def torch_to_te_state(state: dict[str, Tensor], model_with_te: nn.Module | None = None) -> dict[str, Tensor]:
    """Pure function: nn.Linear layout -> te.Linear layout.

    Without `model_with_te` the weights come back unchanged: the layouts differ only by `_extra_state`,
    which no one can make without TE. TE fills it itself: load the result into the converted model with
    `load_state_allowing_missing_extra_state`, which tolerates exactly those missing entries; te.Linear
    then keeps its freshly initialised FP8 scaling state and recalibrates it over the first FP8 steps.

    With `model_with_te` (a model after `models.convert_linears`), its `_extra_state` entries fill the ones
    `state` lacks (entries already in `state` win), so the result loads with `strict=True`. Raises
    ValueError if the weights' names or shapes differ from the model's.
    """
    if model_with_te is None:
        return dict(state)
    target = model_with_te.state_dict()
    target_w = {k: v.shape for k, v in target.items() if not is_extra_state_key(k)}
    state_w = {k: v.shape for k, v in state.items() if not is_extra_state_key(k)}
    differ = sorted(k for k in target_w.keys() | state_w.keys() if target_w.get(k) != state_w.get(k))
    if differ:
        raise ValueError(f"state dict and TE model differ in {len(differ)} tensors (names or shapes): {differ[:5]}")
    dropped = [k for k in state if is_extra_state_key(k) and k not in target]
    if dropped:  # a layer the source ran in TE and this model keeps as nn.Linear
        log.info("dropped %d _extra_state entries for layers that are not te.Linear here", len(dropped))
    out = {}
    for k, v in target.items():  # the model's order: each layer's weights, then its _extra_state
        if k in state:
            out[k] = state[k]
        else:  # a fresh _extra_state (weights are all in `state`, checked above)
            out[k] = v.detach().cpu() if isinstance(v, Tensor) else v
    return out


def load_state_allowing_missing_extra_state(module: nn.Module, state: dict[str, Tensor]):
    """`module.load_state_dict(state, strict=False)` that tolerates only `_extra_state` mismatches.

    Missing `_extra_state` (a plain checkpoint into a te.Linear model: TE keeps its fresh FP8 state) and
    unexpected `_extra_state` (a TE checkpoint into a plain model) are fine; any other missing or unexpected
    key raises RuntimeError before anything is loaded, so a half-loaded model never escapes.
    Returns load_state_dict's result (missing_keys, unexpected_keys).
    """
    expected = module.state_dict().keys()
    missing = [k for k in expected if k not in state and not is_extra_state_key(k)]
    unexpected = [k for k in state if k not in expected and not is_extra_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(
            f"state dict does not fit {type(module).__name__} beyond _extra_state entries: "
            f"missing {len(missing)} {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    return module.load_state_dict(state, strict=False)


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

    try:
        return checkpoint.load(src)
    except RuntimeError as err:  # checkpoint.CheckpointError: one line naming the file
        raise SystemExit(f"argument --src: {str(err).splitlines()[0]}") from err


def _model_config(meta: dict, src: Path) -> ModelConfig:
    try:
        return ModelConfig(**meta["model"])
    except (TypeError, ValueError) as err:
        raise SystemExit(f"--src {src}: metadata.model does not describe a model: {err}") from err


def _tensors(obj: Any, name: str) -> Iterator[tuple[str, Tensor]]:
    """Every tensor inside nested dicts, lists and tuples, with a name like `optimizer['state'][0]['exp_avg']`."""
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

    _refuse_non_finite(ckpt, dst)
    try:
        checkpoint.save_atomic(ckpt, dst)
    except OSError as err:
        raise SystemExit(f"argument --dst: {err.strerror or err}") from err
    print(f"wrote {dst}")


def _stage1_to_stage2(args: argparse.Namespace) -> None:
    state = _load(args.src)
    meta = state.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or meta["model"].get("family") != "ccdit":
        raise SystemExit(f"{args.src}: not a Stage-1 ccDiT checkpoint (metadata.model.family != 'ccdit')")
    cc_cfg = _model_config(state["metadata"], args.src)
    mm_cfg = stage2_config(cc_cfg, args.text_dim, args.text_len)
    weights = checkpoint.WEIGHTS[args.weights]
    if not isinstance(state.get(weights), dict):
        raise SystemExit(f"--weights {args.weights}: {args.src} has no '{weights}' state dict")
    cc_state = checkpoint.model_weights(state, args.weights)  # the plain layout, also of an FP8-trained run
    _refuse_non_finite({weights: cc_state}, args.dst)  # before the parity check prints NaN for every t
    mm_state = ccdit_to_mmdit(cc_state, cc_cfg, mm_cfg, build_model(mm_cfg).state_dict(), args.t_star)

    cc_model, mm_model = build_model(cc_cfg).eval(), build_model(mm_cfg).eval()
    cc_model.load_state_dict(cc_state)
    mm_model.load_state_dict(mm_state)
    ts = sorted({0.0, 0.25, args.t_star, 0.75, 1.0})
    for t, diff in parity(cc_model, mm_model, ts).items():
        mark = "  (t*)" if t == args.t_star else ""
        print(f"max |mmDiT(any caption) - ccDiT(null class)| at t={t:.2f}: {diff:.3e}{mark}")

    metadata = dict(state["metadata"], model=mm_cfg.to_dict(), stage=2, reparameterized_from=str(args.src))
    _save(dict(model=mm_state, ema=mm_state, step=0, metadata=metadata), args.dst)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
