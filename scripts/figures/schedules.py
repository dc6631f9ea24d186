"""Plot the training-time timestep densities and the sampling grids warped by alpha.

    python -m scripts.figures.schedules --out figures/schedules.png

Left: histograms of t (1 = data) as training draws them (flow/rectified_flow.py: a sampler of flow/objective.py,
then the resolution shift). Right: where 24 sampling steps land for several alpha (alpha > 1 spends more of them
near noise, t = 0).
"""

import argparse
from pathlib import Path

import matplotlib

from core.cli_help import HelpFormatter

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from flow import RectifiedFlow, build_timestep_sampler, time_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("figures/schedules.png"))
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    flows = {  # the times training draws: each objective's sampler, then its shift
        "uniform": RectifiedFlow(build_timestep_sampler("uniform")),
        "logit-normal(0, 1)": RectifiedFlow(build_timestep_sampler("logit_normal")),
        "logit-normal(0, 1), shift 3": RectifiedFlow(build_timestep_sampler("logit_normal"), shift=3.0),
        "logit-normal(-0.8, 0.8), JiT": RectifiedFlow(build_timestep_sampler("logit_normal", mean=-0.8, std=0.8)),
    }
    for name, flow in flows.items():
        _, t = flow.draw(torch.zeros(200_000, 1), gen)
        left.hist(t.numpy(), bins=100, range=(0, 1), density=True, histtype="step", lw=1.4, label=name)
    left.set(xlabel="t  (0 = noise, 1 = data)", ylabel="density", title="training timesteps")
    left.legend(fontsize=8)

    for row, alpha in enumerate([1.0, 1.75, 3.0, 6.0]):
        grid = time_grid(args.steps, alpha).numpy()
        right.scatter(grid, [row] * len(grid), s=12)
    right.set_yticks(range(4), [f"α = {a}" for a in [1.0, 1.75, 3.0, 6.0]])
    right.set(xlabel="t", title=f"{args.steps}-step sampling grid, t' = t / (t + α(1 − t))")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
