"""The embedded default's distribution metrics, with no download: a checkpoint of any stage trained on the
synthetic scenes is scored against held-out real scenes.

    from evaluation.embedded import report
    report("outputs/embedded/stage3/checkpoints/step_00000200.pt")   # a dict, as below

    python -m evaluation.embedded --model-path CKPT [--num-samples 500] [--json out.json]

* `frechet_distance`: the Frechet distance [heusel2017fid] between the checkpoint's samples and as many held-out
  real scenes (data/embedded/synthetic.py with seed 1; the training data is seed 0), on the features of the
  repo's own scene encoder (evaluation/scene_encoder.py) instead of Inception's. The samples are conditioned on the
  real scenes' captions (text stages) or shape labels (Stage 1), so both sides follow one distribution of
  conditions. `frechet_distance_real` is the distance between the real scenes and as many other real scenes: what
  a perfect model would score at this sample size, the floor to read the first number against (the estimator is
  biased upward at small n).
* `validation_loss`: the loss by timestep (evaluation/val_loss.py) on the real scenes, encoded with the
  checkpoint's own autoencoder.

Seeds: sample i has noise seed `seed + i` (as evaluation/sample_many.py); the real scenes are indices 0..n-1 of
seed 1 and the floor's of seed 1 from n on.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.precision import add_fp32_flag
from core.cli_help import HelpFormatter
from data.embedded.synthetic import caption, render_scene, spec_for_index

REAL_SEED = 1


def real_scenes(count: int, image_size: int, start: int = 0) -> tuple[np.ndarray, list[str], list[int]]:
    """Held-out real scenes (seed 1): uint8 [n, s, s, 3], their captions and shape labels."""
    specs = [spec_for_index(REAL_SEED, i) for i in range(start, start + count)]
    images = np.stack([np.asarray(render_scene(spec, image_size)) for spec in specs])
    return images, [caption(spec) for spec in specs], [spec.label for spec in specs]


def generate(pipe, captions: list[str], labels: list[int], seed: int, batch_size: int,
             sampling: dict[str, Any]) -> np.ndarray:
    """One sample per real scene's condition, sample i with seed `seed + i`."""
    out = []
    for start in range(0, len(captions), batch_size):
        end = min(start + batch_size, len(captions))
        seeds = list(range(seed + start, seed + end))
        if pipe.is_text:
            images = pipe.generate(prompts=captions[start:end], seeds=seeds, **sampling)
        else:
            images = pipe.generate(labels=labels[start:end], seeds=seeds, **sampling)
        out.append(images.cpu().numpy())
    return np.concatenate(out)


def validation_batches(pipe, images: np.ndarray, captions: list[str], labels: list[int],
                       batch_size: int) -> list[dict[str, torch.Tensor]]:
    """The real scenes as shard-layout batches: latents through the checkpoint's autoencoder, and labels or
    tokens."""
    batches = []
    for start in range(0, len(images), batch_size):
        end = min(start + batch_size, len(images))
        pixels = torch.from_numpy(images[start:end]).permute(0, 3, 1, 2).float() / 255.0
        batch = dict(latents=pipe.vae.encode(pixels).float().cpu())
        if pipe.is_text:
            batch["text_tokens"], batch["attn_mask"] = pipe.conditioning.tokenize(captions[start:end])
        else:
            batch["labels"] = torch.tensor(labels[start:end], dtype=torch.long)
        batches.append(batch)
    return batches


def report(checkpoint: Path | str, num_samples: int = 256, seed: int = 0, batch_size: int = 64,
           steps: int | None = None, cfg_scale: float | None = None, alpha: float | None = None,
           weights: str = "ema", bins: int = 8, device: str | None = "cpu", encoder=None,
           pipe=None, fp32: bool = False) -> dict[str, Any]:
    """The embedded metrics of `checkpoint` (module docstring) as a JSON-ready dict. `encoder`: a feature net
    (default: the committed scene encoder); `pipe`: an already loaded pipeline of that checkpoint; `fp32`: the
    transformer in float32 on CUDA too (app/precision.py)."""
    from app.pipeline import load_pipeline
    from evaluation.metrics import extract, fit_gaussian, frechet_distance
    from evaluation.scene_encoder import encoder_info, load_scene_encoder
    from evaluation.val_loss import ValidationLoss
    from flow.objective import Uniform
    from flow.rectified_flow import RectifiedFlow

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (a covariance), got {num_samples}")
    pipe = pipe or load_pipeline(checkpoint, weights=weights, device=device, fp32=fp32)
    own_encoder = encoder is None
    encoder = encoder or load_scene_encoder(device="cpu")
    size = pipe.image_size
    real, captions, labels = real_scenes(num_samples, size)
    other, _, _ = real_scenes(num_samples, size, start=num_samples)
    defaults = pipe.defaults()
    sampling = dict(steps=steps or defaults["steps"], cfg_scale=defaults["cfg_scale"] if cfg_scale is None
                    else cfg_scale, alpha=alpha or defaults["alpha"])
    fake = generate(pipe, captions, labels, seed, batch_size, sampling)
    real_stats = fit_gaussian(extract(real, encoder, batch_size=batch_size)["pool"])
    fd = frechet_distance(fit_gaussian(extract(fake, encoder, batch_size=batch_size)["pool"]), real_stats)
    floor = frechet_distance(fit_gaussian(extract(other, encoder, batch_size=batch_size)["pool"]), real_stats)
    objective = RectifiedFlow(Uniform(), prediction=pipe.record.prediction)  # its times are replaced by fixed ones
    val = ValidationLoss(validation_batches(pipe, real, captions, labels, batch_size), pipe.conditioning, objective,
                         bins=bins, seed=seed, device=pipe.device, autocast=pipe.autocast)
    losses = val(pipe.model)
    return dict(
        checkpoint=str(checkpoint), weights=weights, conditioning="text" if pipe.is_text else "class",
        image_size=size, num_samples=num_samples, seed=seed, sampling=sampling,
        frechet_distance=fd, frechet_distance_real=floor,
        feature_net="evaluation/scene_encoder.safetensors" if own_encoder else type(encoder).__name__,
        scene_encoder_accuracy=encoder_info().get("test_accuracy") if own_encoder else None,
        validation_loss=losses["val/loss"],
        validation_loss_by_time={k.removeprefix("val/loss_t"): v for k, v in losses.items() if k != "val/loss"},
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m evaluation.embedded", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model-path", type=Path, required=True, help="a checkpoint of an embedded stage, or its run")
    p.add_argument("--num-samples", type=int, default=256, help="samples, and real scenes on each side")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--weights", choices=("ema", "raw"), default="ema")
    p.add_argument("--device", default="cpu")
    add_fp32_flag(p)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    from app.pipeline import CheckpointError
    from app.validation import RequestError

    try:
        out = report(args.model_path, args.num_samples, args.seed, steps=args.steps, cfg_scale=args.cfg_scale,
                     weights=args.weights, device=args.device, fp32=args.fp32)
    except (CheckpointError, RequestError, ValueError) as err:
        raise SystemExit(f"--model-path {args.model_path}: {err}") from err
    text = json.dumps(out, indent=2)
    print(text)
    if args.json is not None:
        from core.files import write_json_atomic

        write_json_atomic(args.json, out)
    print(f"Frechet distance {out['frechet_distance']:.3f} (real vs real at this n: "
          f"{out['frechet_distance_real']:.3f}); validation loss {out['validation_loss']:.4f}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
