"""The loss curve of a run as a plot (out_dir/loss.png); sample grids are core/images.py's."""

import math
from pathlib import Path

import torch


def save_loss_plot(steps: list[int], losses: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [(s, v) for s, v in zip(steps, losses, strict=True) if math.isfinite(v)]  # skipped NaN steps
    steps, losses = [s for s, _ in kept], [v for _, v in kept]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
    window = max(1, len(losses) // 30)
    if len(losses) > window:
        smooth = torch.tensor(losses).unfold(0, window, 1).mean(1).tolist()
        ax.plot(steps[window - 1 :], smooth, lw=1.5, label=f"mean of {window}")
    ax.set(xlabel="step", ylabel="flow-matching MSE", title=title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
