"""Pure functions that carry a model's weights between curriculum stages and between linear layouts; the
command line around them is reparameterize.py (its docstring explains each conversion).

    ccdit_to_mmdit       Stage 1 -> Stage 2: the class-conditional ccDiT's state as a text-conditional mmDiT's
    change_resolution    the same network at another input size (no parameter changes; positions interpolate)
    change_patch         the same network with another patch size: patch embedding and output layer resampled, so
                         a larger image at a larger patch gives the tokens its area-downsampled image gave
    te_to_torch_state    te.Linear layout -> nn.Linear layout (drops `_extra_state`)
    torch_to_te_state    nn.Linear layout -> te.Linear layout
    pixart_to_diffusers  a pixart model's state as diffusers' PixArtTransformer2DModel's (pixart_diffusers_config)
    pixart_lora_to_diffusers  ... and a LoRA adapter of it, on the stock model's modules
    pixart_to_original   ... as the PixArt-alpha repository's .pth keys (what ComfyUI's PixArt loader reads)
    diffusers_to_pixart  the inverse of pixart_to_diffusers (a stock PixArtTransformer2DModel's state as a pixart
                         model's; learn_sigma's variance channels dropped)
    original_to_diffusers  the PixArt-alpha repository's .pth keys as diffusers' (pixart_to_original's inverse, plus
                         PixArt-alpha 1024-MS's size and aspect-ratio embedders)
    strip_wrapper_prefixes  `_orig_mod.` (torch.compile) and `module.` (DDP) removed from a state dict's keys
    ccdit_to_pixart      Stage 1 -> a pixart model: the trunk exactly (halves of the residual stream swapped), the
                         time path exactly where the ccDiT's cond_dim divides 256, the tables exact at t* only
"""


import dataclasses
import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from core.checkpoint import is_extra_state_key
from models import ModelConfig, build_model
from models.embeddings import timestep_embedding

log = logging.getLogger("reparameterize")  # what the conversions report is reparameterize.py's output

# Shapes that must agree for the trunk to carry over.
_SHARED_FIELDS = ("dim", "depth", "heads", "patch", "in_channels", "mlp_ratio", "cond_dim", "time_scale",
                  "time_max_period", "qk_norm")


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
    t_emb = timestep_embedding(torch.tensor([t_star * cc.time_scale]), cc.cond_dim, cc.time_max_period).double()[0]

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
# Patch-size change

PATCH_KEYS = ("patch_embed.proj.weight", "patch_embed.proj.bias", "final.linear.weight", "final.linear.bias")
"""The only tensors whose shapes follow the patch size, in every family built on models/embeddings.py:PatchEmbed and a
final layer that unpatchifies in (p q c) order (ccdit, mmdit, jointdit, pixart)."""


def area_downsample_matrix(src: int, dst: int) -> Tensor:
    """[dst, src] float64: pixel i of a dst-pixel row is the mean of the src-pixel row over [i, i + 1) * src / dst,
    each source pixel weighted by how much of it lies there (the box filter of PIL's `reduce`, at any ratio)."""
    ratio = src / dst
    lo = torch.arange(dst, dtype=torch.float64)[:, None] * ratio
    j = torch.arange(src, dtype=torch.float64)[None, :]
    return (torch.minimum(lo + ratio, j + 1) - torch.maximum(lo, j)).clamp(min=0) / ratio


def change_patch(state: dict[str, Tensor], cfg: ModelConfig, patch: int) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Pure function: (state dict, config) at one patch size -> (config, state dict) at `patch`, the token grid kept.

    In pixel space the patch grows with the image, as JiT does from 256 to 512 px [li2025jit], so a resolution step
    keeps the token grid and every learned spacing (PixArt's latent stages grow the grid instead). With D the area
    downsampling of a new patch to an old one ([p, P] per axis, `area_downsample_matrix`):

    * patch embedding: W' = D^T W D per input channel, so embedding a P x P patch gives exactly what embedding its
      area-downsampled p x p patch gave: the trunk sees a larger image as it saw the smaller one;
    * output layer: W' = U W U^T per output channel with U = pinv(D), the least-norm P x P patch whose area
      downsampling is the old p x p output (D U = I); the bias likewise.

    FlexiViT resamples a patch embedding by such a pseudo-inverse [beyer2023flexivit]. Every other tensor is carried
    unchanged, base_grid included (positions stay where they were when the grid does). Raises ValueError for a
    family without these four tensors (pixeldit, whose pixel path has its own per-pixel layers), or when `state`
    does not match `cfg`.
    """
    if patch <= 0:
        raise ValueError(f"patch={patch} must be a positive integer")
    _check_state_matches(state, cfg)
    missing = [k for k in PATCH_KEYS if k not in state]
    if missing:
        raise ValueError(f"{cfg.name} ({cfg.family}) has no {missing[0]}: change_patch resamples the patch embedding "
                         "and output layer of the ccdit, mmdit, jointdit and pixart families only")
    grid = cfg.input_size // cfg.patch
    new = dataclasses.replace(cfg, patch=patch, input_size=grid * patch, base_grid=cfg.base_grid or grid,
                              extra=dict(cfg.extra))
    down = area_downsample_matrix(patch, cfg.patch)  # [p, P]
    up = torch.linalg.pinv(down)  # [P, p]
    out = dict(state)
    w = state["patch_embed.proj.weight"]
    out["patch_embed.proj.weight"] = torch.einsum("dcpq,pP,qQ->dcPQ", w.double(), down, down).to(w.dtype)
    weight, bias = state["final.linear.weight"], state["final.linear.bias"]
    channels = weight.shape[0] // cfg.patch**2
    w_out = weight.double().reshape(cfg.patch, cfg.patch, channels, -1)
    out["final.linear.weight"] = torch.einsum("pqcd,Pp,Qq->PQcd", w_out, up, up).reshape(
        patch**2 * channels, -1).to(weight.dtype)
    b_out = bias.double().reshape(cfg.patch, cfg.patch, channels)
    out["final.linear.bias"] = torch.einsum("pqc,Pp,Qq->PQc", b_out, up, up).reshape(-1).to(bias.dtype)
    log.info("patch %d -> %d (token grid %d kept): patch embedding and output layer resampled", cfg.patch, patch, grid)
    return new, out


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


WRAPPER_PREFIXES = ("_orig_mod.", "module.")
"""Prefixes a wrapper adds to every key of the state dict it is asked for: torch.compile's OptimizedModule and DDP.
The reference saved its compiled model's state as it was, so its checkpoints carry `_orig_mod.`."""


def strip_wrapper_prefixes(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Pure function: (`state` with every leading WRAPPER_PREFIXES removed, in any order and number, the prefixes that
    were found). Only keys that all carry a prefix are stripped of it, so a model's own `module.` names survive."""
    found: list[str] = []
    while state:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        found.append(prefix)
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state, found


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
# PixArt (models/pixart.py) <-> diffusers' PixArtTransformer2DModel and the PixArt-alpha repository's layout


def pixart_diffusers_config(cfg: ModelConfig) -> dict:
    """The PixArtTransformer2DModel config whose network is the pixart model `cfg` describes (models/pixart.py)."""
    from models.pixart import diffusers_position_scale

    if cfg.family != "pixart":
        raise ValueError(f"only a pixart model is diffusers' PixArtTransformer2DModel, not a {cfg.family}")
    _, interpolation = diffusers_position_scale(cfg)
    return dict(
        num_attention_heads=cfg.heads, attention_head_dim=cfg.dim // cfg.heads, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels, num_layers=cfg.depth, dropout=0.0, norm_num_groups=32,
        cross_attention_dim=cfg.dim if cfg.caption_projection else cfg.text_dim, attention_bias=True,
        sample_size=cfg.input_size, patch_size=cfg.patch,
        activation_fn={"gelu_tanh": "gelu-approximate", "silu": "linear-silu"}[cfg.activation],
        num_embeds_ada_norm=1000, upcast_attention=False, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, interpolation_scale=interpolation, use_additional_conditions=False,
        caption_channels=cfg.text_dim if cfg.caption_projection else None, attention_type="default",
    )


def _pixart_names(cfg: ModelConfig, layout: str) -> dict[str, str]:
    """This repo's pixart parameter name -> the name in `layout` (diffusers or original), for the unsplit tensors.
    The fused self-attention qkv and cross-attention kv are split (diffusers) or renamed (original) separately."""
    diffusers = layout == "diffusers"
    names = {
        "patch_embed.proj": "pos_embed.proj" if diffusers else "x_embedder.proj",
        "t_embedder.fc1": "adaln_single.emb.timestep_embedder.linear_1" if diffusers else "t_embedder.mlp.0",
        "t_embedder.fc2": "adaln_single.emb.timestep_embedder.linear_2" if diffusers else "t_embedder.mlp.2",
        "t_block": "adaln_single.linear" if diffusers else "t_block.1",
        "final.linear": "proj_out" if diffusers else "final_layer.linear",
    }
    if cfg.caption_projection:
        names |= {"caption_projection.fc1": "caption_projection.linear_1" if diffusers else "y_embedder.y_proj.fc1",
                  "caption_projection.fc2": "caption_projection.linear_2" if diffusers else "y_embedder.y_proj.fc2"}
    for i in range(cfg.depth):
        ours, theirs = f"blocks.{i}", f"transformer_blocks.{i}" if diffusers else f"blocks.{i}"
        names |= {f"{ours}.attn.proj": f"{theirs}.attn1.to_out.0" if diffusers else f"{ours}.attn.proj",
                  f"{ours}.cross_attn.q": f"{theirs}.attn2.to_q" if diffusers else f"{ours}.cross_attn.q_linear",
                  f"{ours}.cross_attn.proj": f"{theirs}.attn2.to_out.0" if diffusers else f"{ours}.cross_attn.proj",
                  f"{ours}.mlp.fc1": f"{theirs}.ff.net.0.proj" if diffusers else f"{ours}.mlp.fc1",
                  f"{ours}.mlp.fc2": f"{theirs}.ff.net.2" if diffusers else f"{ours}.mlp.fc2"}
    return names


def pixart_to_diffusers(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Pure function: a pixart state dict -> PixArtTransformer2DModel's (every tensor carried, renamed or split)."""
    _check_state_matches(state, cfg)
    out: dict[str, Tensor] = {}
    for ours, theirs in _pixart_names(cfg, "diffusers").items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(cfg.depth):
        for kind in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"transformer_blocks.{i}.attn1.{name}.{kind}"] = part
            for name, part in zip(("to_k", "to_v"), state[f"blocks.{i}.cross_attn.kv.{kind}"].chunk(2), strict=True):
                out[f"transformer_blocks.{i}.attn2.{name}.{kind}"] = part
        out[f"transformer_blocks.{i}.scale_shift_table"] = state[f"blocks.{i}.scale_shift_table"]
    out["scale_shift_table"] = state["final.scale_shift_table"]
    return {k: v.contiguous() for k, v in out.items()}


def pixart_lora_to_diffusers(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Pure function: a pixart model's LoRA tensors (peft's adapter-file names, `<module>.lora_A.weight` [r, in] and
    `<module>.lora_B.weight` [out, r]) -> the same adapter on PixArtTransformer2DModel's modules (pixart_to_diffusers'
    names). A fused layer's update B A splits exactly as its weight does: the q, k and v parts of qkv (k and v of
    kv) each take the whole A and their rows of B, at the same rank and alpha."""
    names = _pixart_names(cfg, "diffusers")
    for i in range(cfg.depth):
        theirs = f"transformer_blocks.{i}"
        names |= {f"blocks.{i}.attn.qkv": tuple(f"{theirs}.attn1.{n}" for n in ("to_q", "to_k", "to_v")),
                  f"blocks.{i}.cross_attn.kv": tuple(f"{theirs}.attn2.{n}" for n in ("to_k", "to_v"))}
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        module, _, kind = key.partition(".lora_")  # kind: "A.weight" or "B.weight"
        if module not in names or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"LoRA tensor {key!r} is on no layer of a pixart model that diffusers' "
                             "PixArtTransformer2DModel has")
        target = names[module]
        if isinstance(target, str):
            out[f"{target}.lora_{kind}"] = value
            continue
        parts = [value.clone() for _ in target] if kind == "A.weight" else value.chunk(len(target))
        for name, part in zip(target, parts, strict=True):
            out[f"{name}.lora_{kind}"] = part
    return {k: v.contiguous() for k, v in out.items()}


def pixart_to_original(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Pure function: a pixart state dict -> the key layout of the PixArt-alpha repository's .pth (PixArt.py), which
    ComfyUI's PixArt loader reads. That layout always has the caption MLP (`y_embedder.y_proj`), so the model
    needs caption_projection=true. `y_embedder.y_embedding`, PixArt's learned null caption, is zeros: this model's
    dropped caption is zero tokens under an all-False mask. `pos_embed` is the base grid's position table."""
    from models.pixart import diffusers_position_scale, pixart_positions

    if not cfg.caption_projection:
        raise ValueError("the PixArt-alpha layout always projects captions (y_embedder.y_proj): train with "
                         "model.overrides.caption_projection=true, or export --format pixart / diffusers")
    _check_state_matches(state, cfg)
    out = {}
    for ours, theirs in _pixart_names(cfg, "original").items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for i in range(cfg.depth):
        out[f"blocks.{i}.scale_shift_table"] = state[f"blocks.{i}.scale_shift_table"]
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = state[f"blocks.{i}.attn.qkv.{kind}"]
            out[f"blocks.{i}.cross_attn.kv_linear.{kind}"] = state[f"blocks.{i}.cross_attn.kv.{kind}"]
    out["final_layer.scale_shift_table"] = state["final.scale_shift_table"]
    dtype = state["final.scale_shift_table"].dtype
    out["y_embedder.y_embedding"] = torch.zeros(cfg.text_len, cfg.text_dim, dtype=dtype)
    base, scale = diffusers_position_scale(cfg)
    out["pos_embed"] = pixart_positions(cfg.dim, base, base, base, scale)[None].to(dtype)
    return {k: v.contiguous() for k, v in out.items()}


def diffusers_to_pixart(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Pure function: PixArtTransformer2DModel's state dict -> the pixart model `cfg` describes (pixart_to_diffusers'
    inverse: renamed, q/k/v and k/v concatenated). A learn_sigma model's output projection also predicts the
    variance, p*p*2C rows in (p q c) order with the noise in c < C (diffusers' pipelines keep that half): only
    those rows are kept. Its size and aspect-ratio embedders are not read: `bake_micro_conditions` folds them in
    first. KeyError names a missing tensor."""
    out: dict[str, Tensor] = {}
    for ours, theirs in _pixart_names(cfg, "diffusers").items():
        for kind in ("weight", "bias"):
            out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    for i in range(cfg.depth):
        block = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([state[f"{block}.attn1.{n}.{kind}"]
                                                            for n in ("to_q", "to_k", "to_v")])
            out[f"blocks.{i}.cross_attn.kv.{kind}"] = torch.cat([state[f"{block}.attn2.{n}.{kind}"]
                                                                 for n in ("to_k", "to_v")])
        out[f"blocks.{i}.scale_shift_table"] = state[f"{block}.scale_shift_table"]
    out["final.scale_shift_table"] = state["scale_shift_table"]
    p2, c = cfg.patch**2, cfg.out_channels
    rows = out["final.linear.weight"].shape[0]
    if rows not in (p2 * c, 2 * p2 * c):
        raise ValueError(f"proj_out has {rows} rows: neither patch^2 x {c} channels nor twice that (learn_sigma)")
    if rows == 2 * p2 * c:  # learn_sigma: keep the noise half of every patch position
        out["final.linear.weight"] = out["final.linear.weight"].reshape(p2, 2 * c, -1)[:, :c].reshape(p2 * c, -1)
        out["final.linear.bias"] = out["final.linear.bias"].reshape(p2, 2 * c)[:, :c].reshape(p2 * c)
    return {k: v.contiguous() for k, v in out.items()}


MICRO_CONDITION_NAMES = {"csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
                         "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
                         "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
                         "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2"}
"""PixArt-alpha 1024-MS's size and aspect-ratio embedders: the original layout's names -> diffusers'."""
ORIGINAL_UNUSED = ("y_embedder.y_embedding", "pos_embed")
"""Original-layout tensors diffusers' model has no place for: the learned null caption (diffusers' pipelines encode
the negative prompt instead) and the fixed position table (recomputed from the config)."""


def original_to_diffusers(state: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Pure function: a state dict in the PixArt-alpha repository's layout (its PixArt.py / PixArtMS.py modules, what
    its .pth files and pixart_to_original hold) -> PixArtTransformer2DModel's names, the fused qkv and kv_linear split.
    `cfg` gives the depth and whether the caption MLP is there; ORIGINAL_UNUSED tensors are left out, the
    micro-condition embedders (MICRO_CONDITION_NAMES) renamed when present. KeyError names a missing tensor."""
    original, diffusers = _pixart_names(cfg, "original"), _pixart_names(cfg, "diffusers")
    out: dict[str, Tensor] = {}
    for ours, theirs in original.items():
        for kind in ("weight", "bias"):
            out[f"{diffusers[ours]}.{kind}"] = state[f"{theirs}.{kind}"]
    for i in range(cfg.depth):
        block = f"transformer_blocks.{i}"
        for kind in ("weight", "bias"):
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"blocks.{i}.attn.qkv.{kind}"].chunk(3), strict=True):
                out[f"{block}.attn1.{name}.{kind}"] = part
            kv = state[f"blocks.{i}.cross_attn.kv_linear.{kind}"].chunk(2)
            for name, part in zip(("to_k", "to_v"), kv, strict=True):
                out[f"{block}.attn2.{name}.{kind}"] = part
        out[f"{block}.scale_shift_table"] = state[f"blocks.{i}.scale_shift_table"]
    out["scale_shift_table"] = state["final_layer.scale_shift_table"]
    for theirs, ours in MICRO_CONDITION_NAMES.items():
        for kind in ("weight", "bias"):
            if f"{theirs}.{kind}" in state:
                out[f"{ours}.{kind}"] = state[f"{theirs}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- Stage 1 -> PixArt ---------------------------------------------------------------------------------------

PASS_BIAS = 20.0
"""ccdit_to_pixart: the offset beta that keeps SiLU(gamma u + beta) = gamma u + beta to within float32 rounding
(SiLU(z) - z = -z sigmoid(-z), under 5e-8 for z >= 20), so the timestep MLP's second layer passes its input on."""
PASS_SCALE = 0.1
"""ccdit_to_pixart: gamma, the scale of that pass-through. The final layer sees emb(t) itself, so gamma scales how
far its modulation moves off its value at t*; rounding in the block modulations grows as 1 / gamma. On the embedded
Stage-1 EMA (800 steps), the largest |pixart - ccDiT(null class)| at t = 0.1 was 1.14 with gamma = 1, 0.83 with 0.1
and no lower with 0.01; at t* a QK-norm-free ccDiT then matches to 3.5e-5 (1.1e-5 with gamma = 1)."""


def _sinusoid_map(cond_dim: int, time_scale: float) -> Tensor:
    """M [cond_dim, 256] with sinusoid_cond_dim(s t) = M sinusoid_256(s (1 - t)) for every t (s = time_scale =
    1000), in float64. Per frequency w, [cos; sin](w (s - T)) is a reflection of [cos; sin](w T), its own inverse;
    a cond_dim dividing 256 uses every (256 / cond_dim)-th of the 256 frequencies."""
    from models.config import PIXART_TIME_CHANNELS as C

    half, every = C // 2, C // cond_dim
    w = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float64) / half)
    c, s = torch.cos(w * time_scale), torch.sin(w * time_scale)
    reflect = torch.cat([torch.cat([torch.diag(c), torch.diag(s)], 1), torch.cat([torch.diag(s), -torch.diag(c)], 1)])
    rows = torch.arange(0, half, every)
    return reflect[torch.cat([rows, half + rows])]


def _halves_swapped(dim: int) -> Tensor:
    """The permutation taking this repo's [row | col] position channels to diffusers' [col | row]."""
    return torch.cat([torch.arange(dim // 2, dim), torch.arange(dim // 2)])


@torch.no_grad()
def ccdit_to_pixart(
    cc_state: dict[str, Tensor], cc: ModelConfig, px: ModelConfig, px_init: dict[str, Tensor], t_star: float = 0.5
) -> tuple[dict[str, Tensor], list[str]]:
    """Pure function: a Stage-1 ccDiT state dict -> a pixart one, and the list of what carried over inexactly.

    The trunk is the ccDiT's with its residual stream's two halves swapped (models/pixart.py measures positions
    [col | row]; LayerNorm without affine commutes with a permutation, so permuting every weight that reads or
    writes the stream leaves the function unchanged): patch embedding, self-attention, MLP, final projection.
    The time path is block 0's modulation MLP behind the timestep MLP: linear_1 = its first layer with the null
    class baked in and t -> 1 - t folded in (_sinusoid_map), linear_2 a pass-through (PASS_SCALE, PASS_BIAS), t_block
    its second layer; so s(t) = S_0(t, null) for every t. Block tables are S_i - S_0 at t*, the final layer's table
    its modulation at t* less emb(t*) (pixart's final layer has no MLP, so that one is exact at t* only).
    Cross-attention and the caption MLP are px_init's, with a zero output projection. Inexact (listed): attention
    if the ccDiT has QK-norm, the MLP if the activations differ, everything off t*; the whole time path, left at
    px_init, when 256 is not a multiple of the ccDiT's cond_dim."""
    if cc.family != "ccdit" or px.family != "pixart":
        raise ValueError(f"expected ccdit -> pixart, got {cc.family} -> {px.family}")
    if not 0.0 <= t_star <= 1.0:
        raise ValueError(f"t_star must be a finite number in [0, 1] (the time of the exact match), got {t_star}")
    shared = ("dim", "depth", "heads", "patch", "in_channels", "mlp_ratio")
    mismatched = [f for f in shared if getattr(cc, f) != getattr(px, f)]
    if mismatched:
        raise ValueError(f"ccDiT and pixart configs differ in {mismatched}; the trunk cannot carry over")
    perm = _halves_swapped(cc.dim)
    out = {k: v.clone() for k, v in px_init.items()}

    def put(key: str, value: Tensor) -> None:
        out[key] = value.to(px_init[key].dtype).clone()

    put("patch_embed.proj.weight", cc_state["patch_embed.proj.weight"][perm])
    put("patch_embed.proj.bias", cc_state["patch_embed.proj.bias"][perm])
    for i in range(cc.depth):
        b = f"blocks.{i}"
        put(f"{b}.attn.qkv.weight", cc_state[f"{b}.attn.qkv.weight"][:, perm])
        put(f"{b}.attn.qkv.bias", cc_state[f"{b}.attn.qkv.bias"])
        put(f"{b}.mlp.fc1.weight", cc_state[f"{b}.mlp.fc1.weight"][:, perm])
        put(f"{b}.mlp.fc1.bias", cc_state[f"{b}.mlp.fc1.bias"])
        for layer in ("attn.proj", "mlp.fc2"):
            put(f"{b}.{layer}.weight", cc_state[f"{b}.{layer}.weight"][perm])
            put(f"{b}.{layer}.bias", cc_state[f"{b}.{layer}.bias"][perm])
        out[f"{b}.cross_attn.proj.weight"] = torch.zeros_like(px_init[f"{b}.cross_attn.proj.weight"])
        out[f"{b}.cross_attn.proj.bias"] = torch.zeros_like(px_init[f"{b}.cross_attn.proj.bias"])
    # Negated: the network inside a pixart model predicts diffusers' noise - data, which its head negates back.
    put("final.linear.weight", -cc_state["final.linear.weight"][:, perm])
    put("final.linear.bias", -cc_state["final.linear.bias"])

    inexact = ["the attention (the ccDiT has QK-norm, pixart has none)"] if cc.qk_norm else []
    if cc.activation != px.activation:
        inexact.append(f"the MLPs ({cc.activation} in the ccDiT, {px.activation} here)")
    from models.config import PIXART_TIME_CHANNELS

    if cc.time_scale != px.time_scale or cc.time_max_period != px.time_max_period:
        inexact.append(f"the time path (left at px_init: the ccDiT's sinusoid, time_scale {cc.time_scale} and "
                       f"time_max_period {cc.time_max_period}, is not diffusers')")
        return out, inexact
    if cc.cond_dim % 2 or PIXART_TIME_CHANNELS % cc.cond_dim:
        inexact.append(f"the time path (left at px_init: cond_dim {cc.cond_dim} does not divide 256)")
        return out, inexact
    inexact.append(f"the modulation tables away from t*={t_star}")
    _time_path(cc_state, cc, out, px_init, perm, t_star)
    return out, inexact


def _time_path(cc_state, cc: ModelConfig, out: dict, px_init: dict, perm: Tensor, t_star: float) -> None:
    """ccdit_to_pixart's timestep MLP, adaLN-single, block tables and final table (see its docstring)."""
    d = cc.dim
    chunked = lambda v, n: v.reshape(*v.shape[:-1], n, d)[..., perm].reshape(v.shape)  # noqa: E731 (permute chunks)
    e_null = cc_state["y_embed.table.weight"][cc.num_classes].double()
    w1, b1 = cc_state["blocks.0.adaLN.fc1.weight"].double(), cc_state["blocks.0.adaLN.fc1.bias"].double()
    w2, b2 = cc_state["blocks.0.adaLN.fc2.weight"].double(), cc_state["blocks.0.adaLN.fc2.bias"].double()
    dtype = lambda key: px_init[key].dtype  # noqa: E731
    out["t_embedder.fc1.weight"] = (w1 @ _sinusoid_map(cc.cond_dim, cc.time_scale)).to(dtype("t_embedder.fc1.weight"))
    out["t_embedder.fc1.bias"] = (b1 + w1 @ e_null).to(dtype("t_embedder.fc1.bias"))
    out["t_embedder.fc2.weight"] = (PASS_SCALE * torch.eye(d, dtype=torch.float64)).to(dtype("t_embedder.fc2.weight"))
    out["t_embedder.fc2.bias"] = torch.full((d,), PASS_BIAS, dtype=dtype("t_embedder.fc2.bias"))
    w_block = w2 / PASS_SCALE
    out["t_block.weight"] = chunked(w_block.T, 6).T.contiguous().to(dtype("t_block.weight"))
    out["t_block.bias"] = chunked(b2 - PASS_BIAS * w_block.sum(1), 6).to(dtype("t_block.bias"))

    t_emb = timestep_embedding(torch.tensor([t_star * cc.time_scale]), cc.cond_dim).double()[0]
    s0 = _modulation(cc_state, "blocks.0.adaLN", t_emb + e_null)
    for i in range(cc.depth):
        s_i = _modulation(cc_state, f"blocks.{i}.adaLN", t_emb + e_null)
        key = f"blocks.{i}.scale_shift_table"
        out[key] = chunked(s_i - s0, 6).reshape(6, d).to(dtype(key))
    emb = PASS_SCALE * F.silu(F.linear(t_emb + e_null, w1, b1)) + PASS_BIAS  # emb(t*) as the pixart computes it
    final = chunked(_modulation(cc_state, "final.adaLN", t_emb + e_null), 2).reshape(2, d)
    out["final.scale_shift_table"] = (final - emb[None]).to(dtype("final.scale_shift_table"))
