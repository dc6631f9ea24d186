"""Preview grids during training: fixed noise and fixed labels or prompts, so grids from different steps
(and EMA against raw weights) differ only by the weights. One column per label or prompt, `rows` seeds."""

from pathlib import Path

import torch
from omegaconf import DictConfig

from core.conditioning import ClassConditioning
from core.images import save_grid, to_uint8
from flow import sample
from models.embeddings import check_labels
from trainer.errors import ConfigError


class Previewer:
    def __init__(self, cfg: DictConfig, conditioning, vae, model_config, precision, device: torch.device):
        p = cfg.train.preview
        self.p, self.prediction, self.vae, self.precision, self.device = p, cfg.train.prediction, vae, precision, device
        if isinstance(conditioning, ClassConditioning):
            try:
                columns = check_labels(list(p.labels), conditioning.num_classes, "train.preview.labels")
            except ValueError as err:  # the data's classes, not the config's type, decide the range
                raise ConfigError(f"{err}: the classes of data.path={cfg.data.path}") from None
            names = conditioning.class_names + ["null"]
            self.captions = [names[c] for c in columns]
            cond = conditioning.from_labels(columns * p.rows, device)
        else:
            columns = list(p.prompts)
            if not columns:
                raise ConfigError("train.preview.prompts is empty: a text stage needs at least one preview prompt")
            self.captions = columns
            cond = conditioning.from_prompts(columns * p.rows, device)
        self.cols = len(columns)
        self.cond, self.uncond = cond, conditioning.null(len(columns) * p.rows, device)
        gen = torch.Generator().manual_seed(int(p.seed))
        c, s = model_config.in_channels, model_config.input_size
        self.x0 = torch.randn(self.cols * p.rows, c, s, s, generator=gen).to(device)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, path: Path) -> Path:
        p = self.p
        with self.precision.forward():
            latents = sample(
                model,
                self.x0,
                self.cond,
                self.uncond,
                steps=p.steps,
                alpha=p.alpha,
                cfg_scale=p.cfg_scale,
                prediction=self.prediction,
            )
        pixels = self.vae.decode(latents.float().cpu())  # [0, 1]
        save_grid(to_uint8(pixels), path, cols=self.cols, scale=p.scale)
        return path
