"""The reference repository's state dicts (hachoj/Pixart-Alpha-From-Scratch [hachoj2025pixartscratch]: its
models/ccDiT and models/mmDiT, and the Transformer-Engine copies in models_fp8/) as this repo's ccdit and mmdit.

    reference_config(state, text_len, input_size)   the ModelConfig its tensors describe
    reference_to_ours(state, cfg)                   (this repo's state dict, what is not carried exactly)

Their names are `dit_blocks.{i}.attention.attention.q_proj` and so on, with `_orig_mod.` in front when the model was
compiled (models/conversion.py: strip_wrapper_prefixes) and `_extra_state` entries from te.Linear (dropped). The
networks compute what ours do once four layouts are translated, each exactly:

* the residual stream: its position table interleaves sin and cos ([sin y0, cos y0, sin y1, ...| the same for x]) where
  ours puts them in blocks ([sin y | cos y | sin x | cos x]); the frequencies and the positions (base_grid / grid per
  axis) are the same. LayerNorm without affine commutes with a permutation of channels, so permuting every weight
  that writes the stream (patch embedding, attention and MLP outputs, modulations) and reads it (q/k/v, MLP input,
  final projection) gives the same function;
* the time sinusoid: interleaved [sin, cos] of raw t with frequencies 10000^(-k / (half - 1)); here [cos | sin] of
  time_scale * t with 10000^(-k / half): time_scale = 1 and time_max_period = 10000^(half / (half - 1)) give the same
  frequencies, and the channel order is folded into the layers that read it (and the class table added to it);
* the modulation chunks: (scale1, shift1, scale2, shift2, gate1, gate2) there, (shift1, scale1, gate1, shift2, scale2,
  gate2) here, and (scale, shift) against (shift, scale) in the final layer;
* q, k and v: three Linears there, one fused qkv (k and v: kv) here.

Not exact: the norms' epsilons (LayerNorm 1e-5 there, RMSNorm torch's machine epsilon or TE's 1e-5; 1e-6 here), a
relative difference near 1e-6; and the mmDiT's learned null key, which every mmDiT here attends to besides the caption
(so that a dropped caption is defined) and the reference's has not: it starts at zero (its key and value are then
the projections' biases) and takes a share of every cross-attention softmax. Fine-tuning teaches it.
"""

import math

import torch
from torch import Tensor

from core.checkpoint import is_extra_state_key
from models.config import ModelConfig

REFERENCE_MAX_PERIOD_BASE = 10_000.0
"""The base of the reference's time sinusoid: frequencies base^(-k / (half - 1)), k = 0 .. half - 1."""
REFERENCE_TEXT_LEN = 120
"""Caption tokens of the reference's Stage 2 (T5Gemma, 120 tokens): no tensor records it."""
REFERENCE_INPUT_SIZE = 32
"""The reference's latent side (256 px through the SD3 VAE; its base_image_size): no tensor records it."""
MARKERS = ("dit_blocks.0.attention.attention.q_proj.weight", "patchify.weight", "linear_out.weight")
"""Keys every reference state dict holds (after strip_wrapper_prefixes); how the layout is recognised."""


def is_reference_state(state: dict[str, Tensor]) -> bool:
    return all(key in state for key in MARKERS)


def reference_max_period(cond_dim: int) -> float:
    """time_max_period that gives the reference's frequencies: 10000^(-k/(half-1)) = period^(-k/half)."""
    half = cond_dim // 2
    return REFERENCE_MAX_PERIOD_BASE ** (half / (half - 1))


def reference_config(state: dict[str, Tensor], text_len: int = REFERENCE_TEXT_LEN,
                     input_size: int = REFERENCE_INPUT_SIZE) -> ModelConfig:
    """The ccdit (a `cond_proj` class table) or mmdit (`adaLN1_single`) that a reference state dict describes, read
    from its tensors' shapes. ValueError when a tensor the layout needs is missing or its sinusoid is not the
    reference's."""
    missing = [k for k in MARKERS + ("adaLN1.weight", "dit_blocks.0.mlp.linear1.weight",
                                     "dit_blocks.0.attention.attention.q_norm.weight") if k not in state]
    if missing:
        raise ValueError(f"not the reference repository's layout: no {missing}")
    dim, in_channels, patch, _ = state["patchify.weight"].shape
    cond_dim = state["adaLN1.weight"].shape[1]
    head_dim = state["dit_blocks.0.attention.attention.q_norm.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("dit_blocks."))
    _check_sinusoid(state, cond_dim)
    common = dict(size="debug", dim=dim, depth=depth, heads=dim // head_dim, patch=patch, in_channels=in_channels,
                  input_size=input_size, mlp_ratio=state["dit_blocks.0.mlp.linear1.weight"].shape[0] / dim,
                  cond_dim=cond_dim, time_scale=1.0, time_max_period=reference_max_period(cond_dim), qk_norm=True,
                  activation="silu")
    if "cond_proj.weight" in state:
        return ModelConfig(family="ccdit", num_classes=state["cond_proj.weight"].shape[0] - 1, **common)
    if "adaLN1_single.weight" in state:
        text_dim = state["dit_blocks.0.cross_attention.k_proj.weight"].shape[1]
        return ModelConfig(family="mmdit", text_dim=text_dim, text_len=text_len, **common)
    raise ValueError("a reference state dict with neither cond_proj (ccDiT) nor adaLN1_single (mmDiT)")


def _check_sinusoid(state: dict[str, Tensor], cond_dim: int) -> None:
    """The stored `time_proj.freqs` buffer (when saved) must be the reference's frequencies, or nothing here holds."""
    freqs = state.get("time_proj.freqs")
    if freqs is None:
        return
    half = cond_dim // 2
    want = torch.exp(-math.log(REFERENCE_MAX_PERIOD_BASE) * torch.arange(half, dtype=torch.float64) / (half - 1))
    if freqs.shape != want.shape or not torch.allclose(freqs.double(), want, rtol=1e-5, atol=0):
        raise ValueError("time_proj.freqs is not the reference's sinusoid (10000^(-k / (half - 1))); this layout "
                         "cannot be imported exactly")


def stream_permutation(dim: int) -> Tensor:
    """src[o]: the reference's residual channel that this repo's channel o holds ([sin y | cos y | sin x | cos x]
    from the interleaved [sin y0, cos y0, ... | sin x0, cos x0, ...])."""
    j = torch.arange(dim // 4)
    return torch.cat([2 * j, 2 * j + 1, dim // 2 + 2 * j, dim // 2 + 2 * j + 1])


def time_permutation(cond_dim: int) -> Tensor:
    """src[o] for the time sinusoid: [cos | sin] here from the interleaved [sin_0, cos_0, sin_1, ...]."""
    k = torch.arange(cond_dim // 2)
    return torch.cat([2 * k + 1, 2 * k])


MODULATION_ORDER = (1, 0, 4, 3, 2, 5)
"""This repo's (shift1, scale1, gate1, shift2, scale2, gate2) as indices into the reference's (scale1, shift1,
scale2, shift2, gate1, gate2)."""
FINAL_ORDER = (1, 0)
"""(shift, scale) from the reference's (scale, shift)."""


def _chunks(x: Tensor, order: tuple[int, ...], src: Tensor) -> Tensor:
    """A modulation's rows (or vector) in chunks of dim: the chunks reordered, each chunk's channels permuted."""
    n, dim = len(order), src.numel()
    rows = x.reshape(n, dim, *x.shape[1:])[list(order)][:, src]
    return rows.reshape(x.shape)


def reference_to_ours(state: dict[str, Tensor], cfg: ModelConfig) -> tuple[dict[str, Tensor], list[str]]:
    """Pure function: a reference state dict (prefixes stripped) -> (this repo's ccdit / mmdit state dict for `cfg`,
    what is not carried exactly). `_extra_state` entries and the sinusoids' buffers are dropped. KeyError names a
    missing tensor."""
    state = {k: v for k, v in state.items() if not is_extra_state_key(k)}
    src, tsrc = stream_permutation(cfg.dim), time_permutation(cfg.cond_dim)
    out: dict[str, Tensor] = {
        "patch_embed.proj.weight": state["patchify.weight"][src],
        "patch_embed.proj.bias": state["patchify.bias"][src],
        "final.adaLN.fc1.weight": state["adaLN1.weight"][:, tsrc],
        "final.adaLN.fc1.bias": state["adaLN1.bias"],
        "final.adaLN.fc2.weight": _chunks(state["adaLN2.weight"], FINAL_ORDER, src),
        "final.adaLN.fc2.bias": _chunks(state["adaLN2.bias"], FINAL_ORDER, src),
        "final.linear.weight": state["linear_out.weight"][:, src],
        "final.linear.bias": state["linear_out.bias"],
    }
    for i in range(cfg.depth):
        ref, ours = f"dit_blocks.{i}", f"blocks.{i}"
        out |= _attention(state, f"{ref}.attention.attention", f"{ours}.attn", src)
        out |= {f"{ours}.mlp.fc1.weight": state[f"{ref}.mlp.linear1.weight"][:, src],
                f"{ours}.mlp.fc1.bias": state[f"{ref}.mlp.linear1.bias"],
                f"{ours}.mlp.fc2.weight": state[f"{ref}.mlp.linear2.weight"][src],
                f"{ours}.mlp.fc2.bias": state[f"{ref}.mlp.linear2.bias"][src]}
        if cfg.family == "ccdit":
            out |= {f"{ours}.adaLN.fc1.weight": state[f"{ref}.adaLN1.weight"][:, tsrc],
                    f"{ours}.adaLN.fc1.bias": state[f"{ref}.adaLN1.bias"],
                    f"{ours}.adaLN.fc2.weight": _chunks(state[f"{ref}.adaLN2.weight"], MODULATION_ORDER, src),
                    f"{ours}.adaLN.fc2.bias": _chunks(state[f"{ref}.adaLN2.bias"], MODULATION_ORDER, src)}
        else:
            out |= _attention(state, f"{ref}.cross_attention", f"{ours}.cross_attn", src, cross=True)
            out[f"{ours}.embedding"] = _chunks(state[f"{ref}.adaLNembed"], MODULATION_ORDER, src)
    if cfg.family == "ccdit":
        out["y_embed.table.weight"] = state["cond_proj.weight"][:, tsrc]
        return {k: v.contiguous() for k, v in out.items()}, []
    out |= {"t_block.fc1.weight": state["adaLN1_single.weight"][:, tsrc],
            "t_block.fc1.bias": state["adaLN1_single.bias"],
            "t_block.fc2.weight": _chunks(state["adaLN2_single.weight"], MODULATION_ORDER, src),
            "t_block.fc2.bias": _chunks(state["adaLN2_single.bias"], MODULATION_ORDER, src),
            "null_text": torch.zeros(1, 1, cfg.text_dim, dtype=state["patchify.weight"].dtype)}
    inexact = ["the learned null key of every cross-attention (the reference has none; zero here, so its key and "
               "value are the projections' biases and it takes a share of each softmax)"]
    return {k: v.contiguous() for k, v in out.items()}, inexact


def _attention(state: dict[str, Tensor], ref: str, ours: str, src: Tensor, cross: bool = False) -> dict[str, Tensor]:
    """One QKNormedAttention as a SelfAttention (qkv) or CrossAttention (q, kv): inputs from the stream read
    through `src`, the output written through it; a cross-attention's keys and values read the caption as it is."""
    w = {n: state[f"{ref}.{n}_proj.weight"] for n in ("q", "k", "v", "out")}
    b = {n: state[f"{ref}.{n}_proj.bias"] for n in ("q", "k", "v", "out")}
    out = {f"{ours}.norm.q.weight": state[f"{ref}.q_norm.weight"],
           f"{ours}.norm.k.weight": state[f"{ref}.k_norm.weight"],
           f"{ours}.proj.weight": w["out"][src], f"{ours}.proj.bias": b["out"][src]}
    if cross:
        return out | {f"{ours}.q.weight": w["q"][:, src], f"{ours}.q.bias": b["q"],
                      f"{ours}.kv.weight": torch.cat([w["k"], w["v"]]), f"{ours}.kv.bias": torch.cat([b["k"], b["v"]])}
    qkv = torch.cat([w["q"], w["k"], w["v"]])[:, src]
    return out | {f"{ours}.qkv.weight": qkv, f"{ours}.qkv.bias": torch.cat([b["q"], b["k"], b["v"]])}
