"""The README's sampling figures, drawn by the sampling CLI (python -m app.sample) from a demo checkpoint.

    python -m scripts.figures.sampling                       # the newest Stage 5 checkpoint of `make demo`
    python -m scripts.figures.sampling --model-path CKPT --out-dir figures

figures/sampling_prompts.png: a row per prompt, four seeds each, at the checkpoint's own settings.
figures/sampling_ablation.png: guidance scale (rows) against the time-grid warp alpha (columns), each cell the
CLI's grid for the same two prompts and two seeds, so only the setting changes across cells.

Every image comes out of a `python -m app.sample ...` run (printed before it runs), so each can be redrawn from
the command line alone.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from core.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = (
    "a large red circle in the top left on a gray background",
    "a large blue triangle in the center on a gray background",
    "a large yellow square in the bottom right on a gray background",
    "a large green star in the top right on a gray background",
    "a small white circle in the bottom left on a black background",
    "a large purple square in the center on a white background",
)
ABLATION_PROMPTS = PROMPTS[:2]
CFG_SCALES = (1.0, 2.0, 4.0, 7.0)
ALPHAS = (1.0, 1.75, 3.0)


def sample(model_path: Path, prompts: tuple[str, ...], out_dir: Path, *extra: str) -> Path:
    cmd = [sys.executable, "-m", "app.sample", "--model-path", str(model_path), "--out-dir", str(out_dir), *extra]
    for prompt in prompts:
        cmd += ["--prompt", prompt]
    print("$ python " + " ".join(f"'{c}'" if " " in c else c for c in cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return out_dir / "grid.png"


def newest_stage5() -> Path:
    from core import checkpoint

    found = checkpoint.newest(ROOT / "outputs" / "embedded" / "stage5")
    if found is None:
        raise SystemExit("no Stage 5 checkpoint under outputs/embedded/stage5: run `make demo` or pass --model-path")
    return found


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, default=None, help="text checkpoint (default: the demo's Stage 5)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "figures")
    p.add_argument("--steps", type=int, default=24)
    args = p.parse_args(argv)
    model_path = (args.model_path or newest_stage5()).resolve()
    args.out_dir.mkdir(parents=True, exist_ok=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        grid = sample(model_path, PROMPTS, Path(tmp) / "prompts", "--num-samples", "4", "--steps", str(args.steps))
        Image.open(grid).save(args.out_dir / "sampling_prompts.png")
        (args.out_dir / "sampling_prompts.txt").write_text(
            f"{model_path.relative_to(ROOT) if model_path.is_relative_to(ROOT) else model_path}\n"
            "rows (seeds 4k .. 4k+3):\n" + "\n".join(PROMPTS) + "\n")

        fig, axes = plt.subplots(len(CFG_SCALES), len(ALPHAS), figsize=(2.2 * len(ALPHAS), 2.2 * len(CFG_SCALES)))
        for i, cfg in enumerate(CFG_SCALES):
            for j, alpha in enumerate(ALPHAS):
                cell = sample(model_path, ABLATION_PROMPTS, Path(tmp) / f"cfg{cfg}_alpha{alpha}", "--num-samples", "2",
                              "--cfg-scale", str(cfg), "--alpha", str(alpha), "--steps", str(args.steps))
                ax = axes[i, j]
                ax.imshow(Image.open(cell), interpolation="nearest")
                ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"alpha {alpha:g}", fontsize=10)
                if j == 0:
                    ax.set_ylabel(f"guidance {cfg:g}", fontsize=10)
        fig.suptitle("rows: guidance scale; columns: time-grid warp alpha\neach cell: 2 prompts x 2 seeds, "
                     f"{args.steps} Euler steps", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.out_dir / "sampling_ablation.png", dpi=120)
        (args.out_dir / "sampling_ablation.txt").write_text("prompts (a row each inside every cell):\n" +
                                                            "\n".join(ABLATION_PROMPTS) + "\n")
    print(f"wrote {args.out_dir / 'sampling_prompts.png'} and {args.out_dir / 'sampling_ablation.png'}")


if __name__ == "__main__":
    main()
