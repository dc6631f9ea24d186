"""Carry weights between curriculum stages.

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
"""

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from models import ModelConfig, build_model
from models.embeddings import timestep_embedding

# Shapes that must agree for the trunk to carry over.
_SHARED_FIELDS = ("dim", "depth", "heads", "patch", "in_channels", "mlp_ratio", "cond_dim", "time_scale", "qk_norm")


def stage2_config(cc: ModelConfig, text_dim: int, text_len: int) -> ModelConfig:
    """The mmDiT that a ccDiT becomes: same trunk, a text encoder instead of class labels."""
    return dataclasses.replace(cc, family="mmdit", text_dim=text_dim, text_len=text_len)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s12 = sub.add_parser("stage1-to-stage2", help="ccDiT checkpoint -> mmDiT initialisation")
    s12.add_argument("--src", type=Path, required=True, help="Stage-1 checkpoint (.pt)")
    s12.add_argument("--dst", type=Path, required=True, help="where to write the Stage-2 initialisation")
    s12.add_argument("--text-dim", type=int, required=True, help="hidden width of the Stage-2 text encoder")
    s12.add_argument("--text-len", type=int, default=120, help="tokens per caption")
    s12.add_argument("--t-star", type=float, default=0.5, help="time at which block embeddings are exact")
    s12.add_argument("--weights", choices=("ema", "raw"), default="ema", help="which Stage-1 weights to carry")
    args = parser.parse_args()

    from trainer import checkpoint

    state = checkpoint.load(args.src)
    if "metadata" not in state or state["metadata"].get("model", {}).get("family") != "ccdit":
        raise SystemExit(f"{args.src}: not a Stage-1 ccDiT checkpoint (metadata.model.family != 'ccdit')")
    cc_cfg = ModelConfig(**state["metadata"]["model"])
    mm_cfg = stage2_config(cc_cfg, args.text_dim, args.text_len)
    cc_state = state["ema" if args.weights == "ema" else "model"]
    mm_state = ccdit_to_mmdit(cc_state, cc_cfg, mm_cfg, build_model(mm_cfg).state_dict(), args.t_star)

    cc_model, mm_model = build_model(cc_cfg).eval(), build_model(mm_cfg).eval()
    cc_model.load_state_dict(cc_state)
    mm_model.load_state_dict(mm_state)
    ts = sorted({0.0, 0.25, args.t_star, 0.75, 1.0})
    for t, diff in parity(cc_model, mm_model, ts).items():
        mark = "  (t*)" if t == args.t_star else ""
        print(f"max |mmDiT(any caption) - ccDiT(null class)| at t={t:.2f}: {diff:.3e}{mark}")

    metadata = dict(state["metadata"], model=mm_cfg.to_dict(), stage=2, reparameterized_from=str(args.src))
    checkpoint.save_atomic(dict(model=mm_state, ema=mm_state, step=0, metadata=metadata), args.dst)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    main()
