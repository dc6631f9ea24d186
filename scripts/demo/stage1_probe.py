"""What a Stage-1 (class-conditional) checkpoint of the embedded curriculum knows about shapes.

    python -m scripts.demo.stage1_probe CKPT [--per-class 16] [--cfg-scale 3]
                                        [--data DATA_DIR/synthetic-32/shards-labels] [--json OUT.json]

`make demo` runs it on Stage 1's final checkpoint before Stage 2 starts and keeps the figures in its summary.

* shape accuracy: `--per-class` samples of each of the four shape classes (seeds 0, 1, ...), read by the pixel
  analyser (evaluation/analyse.py, the one the held-out evaluation uses); per class, their mean, and the share of
  samples where the analyser finds no shape at all;
* label influence: how much the class moves the model's output, mean |f(x_t, t, c) - f(x_t, t, null)| over
  mean |f(x_t, t, null)|, averaged over the classes, on 64 training images noised at t = 0.2, 0.5 and 0.8 (fixed
  noise), and the mean norm of the class embedding rows (the time sinusoid they are added to has norm
  sqrt(cond_dim / 2)).
"""

import argparse
import json
from pathlib import Path

from core.cli_help import HelpFormatter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--per-class", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--data", type=Path, default=Path("outputs/data/synthetic-32/shards-labels"))
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = p.parse_args()

    import torch

    from app.pipeline import load_pipeline
    from data.embedded.synthetic import SHAPES
    from data.loader import ShardDataset
    from evaluation.analyse import analyse_scene

    pipe = load_pipeline(args.checkpoint, device="cpu")
    labels = [c for c in range(len(SHAPES)) for _ in range(args.per_class)]
    images = pipe.generate(labels=labels, seeds=list(range(len(labels))), cfg_scale=args.cfg_scale, steps=args.steps)
    hits, none = dict.fromkeys(SHAPES, 0), 0
    for label, image in zip(labels, images, strict=True):
        found = analyse_scene(image.numpy())
        none += found is None
        hits[SHAPES[label]] += found is not None and found.shape == SHAPES[label]
    per_class = {k: v / args.per_class for k, v in hits.items()}

    model = pipe.model
    torch.manual_seed(0)
    x1 = next(iter(ShardDataset(args.data, shuffle=False, batch_size=64, verify_checksum=False)))["latents"].float()
    null = torch.full((len(x1),), model.config.num_classes)
    influence = {}
    with torch.no_grad():
        for t in (0.2, 0.5, 0.8):
            x_t = (1 - t) * torch.randn_like(x1) + t * x1
            times = torch.full((len(x1),), t)
            base = model(x_t, times, labels=null)
            moved = [float((model(x_t, times, labels=torch.full_like(null, c)) - base).abs().mean() / base.abs().mean())
                     for c in range(model.config.num_classes)]
            influence[str(t)] = sum(moved) / len(moved)
    rows = model.y_embed.table.weight[: model.config.num_classes].norm(dim=1)
    text = json.dumps(dict(checkpoint=str(args.checkpoint), cfg_scale=args.cfg_scale, steps=args.steps,
                           samples_per_class=args.per_class, shape_per_class=per_class,
                           shape_mean=sum(per_class.values()) / len(per_class), no_shape=none / len(labels),
                           label_influence=influence, label_row_norm=float(rows.mean()),
                           time_sinusoid_norm=(model.config.cond_dim / 2) ** 0.5), indent=1)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
