"""Pure functions that carry a model's weights between curriculum stages and between linear layouts; the
command line around them is reparameterize.py (its docstring explains each conversion).

    ccdit_to_mmdit       Stage 1 -> Stage 2: the class-conditional ccDiT's state as a text-conditional mmDiT's
    change_resolution    the same network at another input size (no parameter changes; positions interpolate)
    te_to_torch_state    te.Linear layout -> nn.Linear layout (drops `_extra_state`)
    torch_to_te_state    nn.Linear layout -> te.Linear layout
"""


import dataclasses
import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.checkpoint import is_extra_state_key
from models import ModelConfig, build_model
from models.embeddings import timestep_embedding

log = logging.getLogger("reparameterize")  # what the conversions report is reparameterize.py's output

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
