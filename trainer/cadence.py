"""Evaluation on cadence during training (train.eval): the validation loss by timestep on held-out shards and,
optionally, a small FID of the EMA's samples (evaluation/). Built on every rank: both split their work over the
ranks and all-reduce, so every rank logs the same numbers."""

import logging
import time

import torch
from omegaconf import DictConfig

from trainer import builders
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


class CadenceEvaluation:
    """`self(ema_model, model, done, final)` -> the values to log at this step ({} when not due)."""

    def __init__(self, cfg: DictConfig, env, spec, conditioning, objective, precision, vae):
        e = cfg.train.eval
        from evaluation.sample_fid import SampleFID, feature_net
        from evaluation.sample_many import read_captions
        from evaluation.val_loss import ValidationLoss, check_held_out

        self.every, self.weights = int(e.every), e.weights
        folder, ranks = e.data or cfg.data.path, env
        if e.data is None:
            log.warning("train.eval.data is null: the validation loss reads the training data (%s), not held-out "
                        "records", folder)
        try:
            check_held_out(folder, spec)
            self.validation = ValidationLoss.from_shards(
                folder, conditioning, objective, e.samples, e.batch_size, bins=e.bins, seed=cfg.seed,
                device=env.device, autocast=precision.forward, ranks=ranks,
                text_features=builders.loader_options(cfg, conditioning)["text_features"])
        except (ValueError, OSError) as err:
            raise ConfigError(f"train.eval.data={folder!r}: {err}") from err
        self.sample_fid = None
        if not e.fid_samples:
            return
        if e.fid_reference is None:
            raise ConfigError("train.eval.fid_samples > 0 needs train.eval.fid_reference (a reference .npz or folder)")
        p = cfg.train.preview
        try:
            captions = read_captions(e.fid_captions or folder) if spec.kind == "text" else None
            self.sample_fid = SampleFID(
                e.fid_samples, e.fid_reference, feature_net(e.fid_features, env.device, e.inception_weights),
                conditioning, vae, spec.latent_shape, cfg.train.prediction,
                dict(steps=p.steps, cfg_scale=p.cfg_scale, alpha=p.alpha), captions, cfg.seed, e.batch_size,
                env.device, ranks, precision.forward)
        except (ValueError, OSError, ImportError) as err:
            raise ConfigError(f"train.eval.fid_*: {err}") from err

    @classmethod
    def build(cls, cfg: DictConfig, *args) -> "CadenceEvaluation | None":
        return cls(cfg, *args) if cfg.train.eval.every else None

    def __call__(self, ema_model: torch.nn.Module, model: torch.nn.Module, done: int, final: bool) -> dict:
        """The validation loss of the chosen weights (val/ for the EMA, val_raw/ for the raw ones), the FID of the
        EMA's samples, and the seconds it all took (val/seconds), at every `every` steps and the last."""
        if not (final or done % self.every == 0):
            return {}
        tic = time.perf_counter()
        values = {}
        for name, weights, prefix in (("ema", ema_model, "val/"), ("raw", model, "val_raw/")):
            if self.weights in (name, "both"):
                values |= {prefix + k.removeprefix("val/"): v for k, v in self.validation(weights).items()}
        if self.sample_fid is not None:
            values |= self.sample_fid(ema_model)
        values["val/seconds"] = time.perf_counter() - tic
        first = next(k for k in values if k.endswith("/loss"))
        log.info("step %d: %s %.4f over %d held-out records x %d times (%.1f s, not counted in img/s)", done, first,
                 values[first], self.validation.num_samples, len(self.validation.times), values["val/seconds"])
        return values
