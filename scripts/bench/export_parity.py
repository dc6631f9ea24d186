"""A checkpoint exported for diffusers samples the pixels app/sample.py samples: the parity figures, printed.

    python -m scripts.bench.export_parity [--model-path outputs/embedded/stage5] [--out-dir outputs/export_parity]

Exports the checkpoint (`python -m app.export --format diffusers`), draws two prompts with N seeds each
once through `app/sample.py` and once through `RFDiTPipeline.from_pretrained` on the exported folder (each with the
checkpoint's own steps, guidance and alpha), and prints the largest and mean absolute difference over the uint8
pixels, with the difference between two seeds beside them for scale. Also at a non-square size one pixel unit (the
patch, times the autoencoder's factor) shorter and one longer than the trained side: 42x54 for the embedded Stage 5
(48 px at patch 6).
"""

import argparse
import json
from pathlib import Path

from core.cli_help import HelpFormatter

PROMPTS = ("a large red circle in the top left on a gray background",
           "a large blue triangle in the center on a gray background")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, default=Path("outputs/embedded/stage5"))
    p.add_argument("--out-dir", type=Path, default=Path("outputs/export_parity"))
    p.add_argument("--seeds", type=int, default=4)
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from app.diffusers_pipeline import RFDiTPipeline
    from app.export import main as export_main
    from app.sample import main as sample_main
    from core import checkpoint

    meta = checkpoint.load(checkpoint.resolve(args.model_path, "--model-path"))["metadata"]
    side = meta["image_size"]
    unit = side // meta["latent_shape"][-1] * meta["model"]["patch"]
    height, width = side - unit, side + unit
    folder = args.out_dir / "diffusers"
    export_main(["--model-path", str(args.model_path), "--out-dir", str(folder), "--force"])
    pipe = RFDiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    report = {}
    for name, size in (("trained size", []), (f"{height}x{width}", ["--height", str(height), "--width", str(width)])):
        cli_dir = args.out_dir / f"cli_{name.replace(' ', '_')}"
        flags = [f for prompt in PROMPTS for f in ("--prompt", prompt)]
        sample_main(["--model-path", str(args.model_path), "--out-dir", str(cli_dir), "--device", "cpu", "--seed",
                     "0", "--num-samples", str(args.seeds), *flags, *size])
        cli = {q.stem: np.asarray(Image.open(q)).astype(int) for q in cli_dir.glob("*_seed_*.png")}
        kwargs = dict(height=height, width=width) if size else {}
        diffs, between = [], []
        for i, prompt in enumerate(PROMPTS):
            seeds = [i * args.seeds + j for j in range(args.seeds)]  # app/sample.py's rule for prompt i
            images = pipe(prompt=[prompt] * len(seeds), generator=[torch.Generator().manual_seed(s) for s in seeds],
                          output_type="pil", **kwargs).images
            for s, image in zip(seeds, images, strict=True):
                want = cli[f"prompt_{i:02d}_seed_{s}"]
                diffs.append(np.abs(np.asarray(image).astype(int) - want))
            first, second = (cli[f"prompt_{i:02d}_seed_{s}"] for s in seeds[:2])
            between.append(np.abs(first - second).mean())
        report[name] = dict(images=len(diffs), max_abs=int(max(d.max() for d in diffs)),
                            mean_abs=float(np.mean([d.mean() for d in diffs])),
                            mean_abs_between_two_seeds=float(np.mean(between)))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
