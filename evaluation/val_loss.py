"""The validation loss by timestep, as SD3 reports it [esser2024sd3]: the training objective on held-out data at
fixed times with fixed noise. Cheap (one forward per time and batch), deterministic, it follows sample quality
and compares across runs and checkpoints where the training loss, with its random times, does not.

    val = ValidationLoss.from_shards("held-out/shards", conditioning, objective, num_samples=1024)
    val(model)   # {"val/loss": mean over the times, "val/loss_t0.062": ..., ..., "val/loss_t0.938": ...}

The times are the centres of `bins` equal bins of [0, 1] (8 by default: 0.0625, 0.1875, ..., 0.9375; t = 0 is
noise, t = 1 data), in the model's own time: no resolution shift, so the bins mean the same at every resolution.
The objective is flow/rectified_flow.py's RectifiedFlow with its time sampler replaced by the fixed time, so the
path, the prediction type and the loss are exactly the training ones. Held-out batch i (records i*B ... of the
folder, unshuffled) draws its noise from a generator seeded by (seed, i), the same noise at every time and every
evaluation. Batches are dealt round-robin over the ranks and the sums are reduced, so the value does not depend on
the number of ranks; it depends on the records, the batch size and the seed, which a run keeps fixed. Every rank
runs as many forwards (core/ranks.py: Ranks.rounds), as a sharded model needs.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from core.ranks import ALONE, Ranks
from data.loader import ShardDataset, mix_seed
from flow.rectified_flow import RectifiedFlow

DEFAULT_BINS = 8


def bin_times(bins: int = DEFAULT_BINS) -> list[float]:
    """The centres of `bins` equal bins of [0, 1]."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    return [(k + 0.5) / bins for k in range(bins)]


def time_key(t: float) -> str:
    return f"val/loss_t{t:.3f}"


@dataclass(frozen=True)
class FixedTime:
    """A time sampler (flow/objective.py's protocol) that gives every sample the time `t` and draws nothing."""

    t: float

    def __call__(self, batch_size: int, *, generator=None, device=None) -> Float[Tensor, " b"]:
        return torch.full((batch_size,), float(self.t), device=device)


def _comparable(spec) -> dict:
    """What two shard folders must share for one model to be scored on both."""
    tokenizer = spec.tokenizer or {}
    return dict(kind=spec.kind, latent_shape=list(spec.latent_shape), vae=spec.vae, num_classes=spec.num_classes,
                tokenizer={k: tokenizer.get(k) for k in ("id", "sha256", "max_length", "vocab_size")})


def check_held_out(path: Path | str, spec) -> None:
    """ValueError unless the shard folder at `path` holds records like the training data's (`spec`, a
    data/shards.py DatasetSpec): the same kind, latent shape, VAE and scale, classes or tokenizer."""
    from data.shards import read_manifest

    held, train = _comparable(read_manifest(path)[1]), _comparable(spec)
    differ = [f"{k} {held[k]!r} there, {train[k]!r} in the training data" for k in held if held[k] != train[k]]
    if differ:
        raise ValueError(f"{path}: its records are not like the training data's ({'; '.join(differ)})")


def read_held_out(path: Path | str, num_samples: int, batch_size: int, text_features: bool = False
                  ) -> list[dict[str, Tensor]]:
    """The first `num_samples` records of a shard folder (all of them if fewer), unshuffled, in batches, with the
    stored encoder states when `text_features`. With aspect-ratio buckets every bucket gives its share of the
    samples (in proportion to its records, at least one), its first records, in batches of that bucket alone:
    the first records of the folder would all be of one bucket."""
    options = dict(shuffle=False, batch_size=batch_size, verify_checksum=False, text_features=text_features)
    whole = ShardDataset(path, **options)
    if not whole.bucketed:
        return _first_records(whole, min(num_samples, whole.num_records))
    counts = {pool.name: pool.num_records for pool in whole.pools}
    total, batches = sum(counts.values()), []
    for name, count in counts.items():
        share = min(count, max(1, round(num_samples * count / total)))
        small = options | dict(batch_size=min(batch_size, count))  # a bucket smaller than a batch still counts
        batches += _first_records(ShardDataset(path, buckets=[name], **small), share)
    return batches


def _first_records(data: ShardDataset, n: int) -> list[dict[str, Tensor]]:
    stream, batches = iter(data), []  # the stream repeats itself after one epoch: take n records, no more
    for start in range(0, n, data.batch_size):
        batch = next(stream)
        batches.append({k: v[: n - start] for k, v in batch.items()})
    return batches


class ValidationLoss:
    """The loss at fixed times on fixed held-out batches (module docstring); call it with a model."""

    def __init__(self, batches: list[dict[str, Tensor]], conditioning, objective: RectifiedFlow,
                 bins: int = DEFAULT_BINS, seed: int = 0, device: torch.device | str = "cpu",
                 autocast: Callable[[], AbstractContextManager] = nullcontext, ranks: Ranks = ALONE):
        if not batches:
            raise ValueError("the validation loss needs at least one held-out batch")
        self.batches, self.conditioning, self.seed = batches, conditioning, seed
        self.times = bin_times(bins)
        # Unweighted (SD3 reports the plain loss by time): a run's train.timesteps.weighting would only rescale each
        # bin by a constant and make runs with different weightings incomparable.
        self.objectives = [replace(objective, timesteps=FixedTime(t), shift=None, weighting="none")
                           for t in self.times]
        self.device, self.autocast, self.ranks = torch.device(device), autocast, ranks
        self.num_samples = sum(len(b["latents"]) for b in batches)

    @classmethod
    def from_shards(cls, path: Path | str, conditioning, objective: RectifiedFlow, num_samples: int = 1024,
                    batch_size: int = 32, text_features: bool = False, **kwargs) -> "ValidationLoss":
        return cls(read_held_out(path, num_samples, batch_size, text_features), conditioning, objective, **kwargs)

    def generator(self, batch: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(mix_seed(self.seed, "validation", batch))
        return gen

    @torch.no_grad()
    def sums(self, model: torch.nn.Module) -> Float[Tensor, " bins"]:
        """This rank's sum over its batches of (loss x batch size) per time."""
        totals = torch.zeros(len(self.times), dtype=torch.float64)
        for i in self.ranks.rounds(len(self.batches)):
            # A rank with fewer batches than others runs one record of batch 0 and drops it (Ranks.rounds).
            batch = self.batches[i] if i is not None else {k: v[:1] for k, v in self.batches[0].items()}
            x1 = batch["latents"].to(self.device, torch.float32)
            cond = self.conditioning.from_batch(batch, None, self.device)  # no generator: no dropout
            for k, objective in enumerate(self.objectives):
                with self.autocast():
                    loss = objective.loss(model, x1, cond, self.generator(i or 0))  # the same noise at every time
                if i is not None:
                    totals[k] += float(loss) * len(x1)
        return totals

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{"val/loss": the mean over the times, and one "val/loss_tT" per time}, the same on every rank."""
        per_time = (self.ranks.sum(self.sums(model)) / self.num_samples).tolist()
        return {"val/loss": sum(per_time) / len(per_time)} | {time_key(t): v for t, v in zip(self.times, per_time,
                                                                                              strict=True)}
