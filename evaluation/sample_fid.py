"""A small FID while a model trains (train.eval.fid_samples, e.g. 5,000): samples drawn on every rank from the
model being trained, their features gathered, one Frechet distance against a reference fitted once.

Sample i has noise seed `seed + i` and the label `sample_many.class_label(seed, i, ...)` (uniform at random) or
caption `i % len(captions)`, so every evaluation of a run draws from the same noise and conditions and the curve
moves only with the weights. The ranks take the indices round-robin, and each samples as many batches (a sharded
model's forward is a collective); the sampler is flow/sampler.py's, with the run's preview settings (steps,
guidance, alpha). Features: the FID Inception (evaluation/features.py) or, for the embedded runs, the repo's scene
encoder (evaluation/scene_encoder.py), which needs no download.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.ranks import ALONE, Ranks
from evaluation.metrics import fit_gaussian, frechet_distance, load_reference
from evaluation.sample_many import class_label


def feature_net(name: str, device: torch.device, inception_weights: str | None = None):
    """inception (torch-fidelity's FID Inception) or scene (the committed scene encoder)."""
    if name == "scene":
        from evaluation.scene_encoder import load_scene_encoder

        return load_scene_encoder(device=device)
    if name == "inception":
        from evaluation.features import InceptionFeatures

        return InceptionFeatures(inception_weights).to(device)
    raise ValueError(f"unknown feature net {name!r}: inception or scene")


class SampleFID:
    """Call with a model: {"fid/fid": ..., "fid/samples": n} on every rank."""

    def __init__(self, num_samples: int, reference: Path | str, features, conditioning, vae, latent_shape,
                 prediction: str, sampling: dict[str, Any], captions: list[str] | None = None, seed: int = 0,
                 batch_size: int = 32, device: torch.device | str = "cpu", ranks: Ranks = ALONE,
                 autocast: Callable[[], AbstractContextManager] = nullcontext):
        if num_samples < 2:
            raise ValueError(f"a FID needs at least 2 samples, got {num_samples}")
        if conditioning.kind == "text" and not captions:
            raise ValueError("a text model's FID needs captions to condition its samples on")
        self.n, self.features, self.conditioning, self.vae = num_samples, features, conditioning, vae
        self.latent_shape, self.prediction, self.sampling = tuple(latent_shape), prediction, dict(sampling)
        self.captions, self.seed, self.batch_size = captions, seed, batch_size
        self.device, self.ranks, self.autocast = torch.device(device), ranks, autocast
        self.reference = load_reference(reference, features, ranks, batch_size, str(self.device))

    def condition(self, indices: list[int]) -> tuple[dict, dict]:
        n = len(indices)
        if self.conditioning.kind == "text":
            prompts = [self.captions[i % len(self.captions)] for i in indices]
            cond = self.conditioning.from_prompts(prompts, self.device)
        else:
            labels = [class_label(self.seed, i, self.conditioning.num_classes, "uniform") for i in indices]
            cond = self.conditioning.from_labels(labels, self.device)
        return cond, self.conditioning.null(n, self.device)

    @torch.no_grad()
    def latents(self, model: torch.nn.Module, indices: list[int]) -> torch.Tensor:
        """The sampled latents of `indices` (their noise, their conditions)."""
        from flow import sample

        noise = torch.stack([torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(self.seed + i))
                             for i in indices]).to(self.device)
        cond, uncond = self.condition(indices)
        with self.autocast():
            return sample(model, noise, cond, uncond, prediction=self.prediction, **self.sampling)

    def images(self, model: torch.nn.Module, indices: list[int]) -> np.ndarray:
        """uint8 NHWC samples of `indices`."""
        from core.images import to_uint8

        return to_uint8(self.vae.decode(self.latents(model, indices).float().cpu())).numpy()

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        mine, pools = list(self.ranks.mine(self.n)), []
        # Every rank samples as many batches as rank 0, which has the most (a sharded model's forward is a
        # collective: core/ranks.py, Ranks.rounds); a rank with fewer draws a stand-in of one and drops it.
        most = len(self.ranks.rounds(self.n))
        for start in range(0, most, self.batch_size):
            indices = mine[start : start + self.batch_size]
            if not indices:
                self.latents(model, [0])
                continue
            images = self.images(model, indices)
            pools.append(self.features(torch.from_numpy(images).permute(0, 3, 1, 2).to(self.device))["pool"].cpu())
        if not pools:  # no index fell to this rank: rows of the right width for the gather
            pools = [self.features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8, device=self.device))["pool"][:0].cpu()]
        gathered = self.ranks.gather_rows(torch.cat(pools).float())
        return {"fid/fid": frechet_distance(fit_gaussian(gathered), self.reference.pool), "fid/samples": self.n}
