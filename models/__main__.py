"""`python -m models`: a table of every named model with its parameters and forward GFLOPs.

Models are built on the meta device (no memory, no init cost) and FLOPs are counted by
torch.utils.flop_counter at batch 1 and each model's default resolution (2 FLOPs per multiply-add;
DiT's paper reports multiply-adds, so its "Gflops" are half of these).
"""

import argparse

from core.cli_help import HelpFormatter


def example_inputs(cfg, batch: int = 1, device: str = "meta") -> dict:
    """Inputs of the right shapes for one forward at the model's default resolution (torch tensors)."""
    import torch

    x = torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=device)
    t = torch.full((batch,), 0.5, device=device)
    if cfg.conditioning == "class":
        return dict(x=x, t=t, labels=torch.zeros(batch, dtype=torch.long, device=device))
    text = torch.zeros(batch, cfg.text_len, cfg.text_dim, device=device)
    return dict(x=x, t=t, text=text, text_mask=torch.ones(batch, cfg.text_len, dtype=torch.bool, device=device))


def describe(name: str) -> tuple[str, int, float, str]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import build_model, model_config

    cfg = model_config(name)
    with torch.device("meta"):
        model = build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**example_inputs(cfg))
    shape = f"{cfg.in_channels}x{cfg.input_size}x{cfg.input_size}"
    return name, params, counter.get_total_flops() / 1e9, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("names", nargs="*", help="model names (default: every named model)")
    args = parser.parse_args()
    from models.registry import named_models

    rows = [describe(n) for n in (args.names or named_models())]
    print(f"{'model':<18} {'params':>15} {'GFLOPs':>10}  input (batch 1)")
    for name, params, gflops, shape in rows:
        print(f"{name:<18} {params:>15,} {gflops:>10.2f}  {shape}")


if __name__ == "__main__":
    main()
