"""A trained checkpoint as an image generator: everything it needs comes from the checkpoint's metadata.

    pipe = load_pipeline("outputs/embedded/stage5/checkpoints/step_00000150.pt")
    images = pipe.generate(prompts=["a large red circle in the top left on a gray background"], seeds=[0])

The model family and size, the prediction type, the text encoder and tokenizer (text checkpoints) or the
class names (class checkpoints), and the VAE with the scale, shift and pixel range the training latents
were encoded with are all recorded by the trainer, so no flag repeats them. Used by app/sample.py, the
Gradio app and evaluation/evaluate.py; the training previews share the same sampler (flow/sampler.py).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from jaxtyping import UInt8
from torch import Tensor

from flow import sample
from models import ModelConfig
from models.config import CONDITIONINGS, default_conditioning
from trainer import checkpoint
from trainer.conditioning import ClassConditioning, TextConditioning


class CheckpointError(ValueError):
    """A file that is not a checkpoint this repository's trainer wrote, or not one of the kind asked for."""


def read_metadata(path: Path | str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the whole checkpoint, its metadata); CheckpointError names the file and what is missing."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--model-path {path}: no such file")
    try:
        state = checkpoint.load(path)
    except RuntimeError as err:
        raise CheckpointError(f"--model-path {path}: not a readable checkpoint ({err})") from err
    meta = state.get("metadata") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "model" not in meta or "conditioning" not in meta:
        raise CheckpointError(
            f"--model-path {path}: no metadata.model / metadata.conditioning; not a checkpoint written by this "
            "repository's trainer (reparameterize.py outputs are initialisations: train them first)"
        )
    check_conditioning(path, meta)
    return state, meta


def check_conditioning(path: Path, meta: dict[str, Any]) -> None:
    """The conditioning the metadata records must be the one its model was built for (metadata.model.conditioning;
    for checkpoints older than that field, the family's default) and come with what it needs.
    `reparameterize.py stage1-to-stage2` writes an mmDiT that still carries Stage 1's class metadata: without
    this check it would load and fail at the first forward, far from the cause."""
    model = meta["model"] if isinstance(meta["model"], dict) else {}
    family = model.get("family")
    if family not in CONDITIONINGS:
        raise CheckpointError(f"--model-path {path}: metadata.model.family is {family!r}, not one of "
                              f"{', '.join(CONDITIONINGS)}")
    expected = model.get("conditioning") or default_conditioning(family)  # older checkpoints: the family's
    needs = ("num_classes",) if expected == "class" else ("text_encoder", "tokenizer")
    problems = [f"metadata.conditioning is {meta['conditioning']!r}"] if meta["conditioning"] != expected else []
    problems += [f"no metadata.{key}" for key in needs if not meta.get(key)]
    if problems:
        raise CheckpointError(
            f"--model-path {path}: a {family} model takes {expected} conditioning, but {', '.join(problems)}; "
            "an initialisation from reparameterize.py? Train it first (train.init_from=<that file>)"
        )


@dataclass
class Pipeline:
    model: torch.nn.Module
    conditioning: ClassConditioning | TextConditioning
    vae: Any
    metadata: dict[str, Any]
    device: torch.device

    @property
    def is_text(self) -> bool:
        return isinstance(self.conditioning, TextConditioning)

    @property
    def image_size(self) -> int:
        return int(self.metadata.get("image_size") or self.model.config.input_size)

    def defaults(self) -> dict[str, Any]:
        """Sampling settings the checkpoint's stage previewed with (steps, cfg_scale, alpha)."""
        return dict(steps=24, cfg_scale=4.0, alpha=1.0) | dict(self.metadata.get("sampling") or {})

    def prompt_length(self, prompt: str) -> int:
        """Tokens `prompt` takes with the checkpoint's tokenizer, special tokens included and not truncated.
        The text encoder reads only the first `conditioning.max_length`; front ends use this to refuse a longer
        prompt instead of dropping its end silently."""
        if not self.is_text:
            raise ValueError("prompt_length needs a text-conditional checkpoint")
        return self.conditioning.token_count(prompt)

    def noise(self, seeds: list[int], size: int | tuple[int, int] | None = None) -> Tensor:
        """One noise image per seed from its own generator: a sample depends on its seed only, not on the
        batch it is drawn in. `size`: the model's input side, or (height, width), in latent pixels."""
        cfg: ModelConfig = self.model.config
        h, w = (size, size) if isinstance(size, int) else size or (cfg.input_size, cfg.input_size)
        return torch.stack(
            [torch.randn(cfg.in_channels, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self.device)

    def input_size_for(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        """Image height and width in pixels -> the model's input size (latent pixels); None keeps the trained
        size. ValueError naming --height / --width when the model cannot take that size."""
        if height is None and width is None:
            return None
        factor = self.image_size // self.model.config.input_size  # 8 for SD3 latents, 1 in pixel space
        unit = factor * self.model.config.patch
        sizes = dict(height=height or self.image_size, width=width or self.image_size)
        for flag, value in sizes.items():
            if value <= 0 or value % unit:
                raise ValueError(f"--{flag} {value}: this model takes multiples of {unit} pixels "
                                 f"(patch {self.model.config.patch} x VAE factor {factor})")
        return sizes["height"] // factor, sizes["width"] // factor

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str] | None = None,
        labels: list[int] | None = None,
        seeds: list[int] | None = None,
        steps: int | None = None,
        cfg_scale: float | None = None,
        alpha: float | None = None,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        method: str = "euler",
        size: int | tuple[int, int] | None = None,
        return_trajectory: bool = False,
        cuda_graphs: bool = False,
    ) -> UInt8[Tensor, "b h w 3"] | tuple[UInt8[Tensor, "b h w 3"], UInt8[Tensor, "n b h w 3"]]:
        """Images as uint8 [b, h, w, 3], one per prompt (text) or label (class) with its seed; with
        `return_trajectory` also the decoded states on the time grid [steps + 1, b, h, w, 3]. `cuda_graphs`
        (CUDA only) replays the transformer from CUDA graphs (flow/sampler.py); worth it for repeated calls."""
        if self.is_text:
            if prompts is None or labels is not None:
                raise ValueError("this is a text-conditional checkpoint: pass prompts=, not labels=")
            cond = self.conditioning.from_prompts(list(prompts), self.device)
            n = len(prompts)
        else:
            if labels is None or prompts is not None:
                raise ValueError("this is a class-conditional checkpoint: pass labels=, not prompts=")
            bad = [c for c in labels if not 0 <= int(c) <= self.conditioning.null_label]
            if bad:
                raise ValueError(f"labels {bad} outside 0..{self.conditioning.null_label} (the last is the null class)")
            cond = self.conditioning.from_labels([int(c) for c in labels], self.device)
            n = len(labels)
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} images")
        d = self.defaults()
        out = sample(
            self.model,
            self.noise(seeds, size),
            cond,
            self.conditioning.null(n, self.device),
            steps=int(steps if steps is not None else d["steps"]),
            alpha=float(alpha if alpha is not None else d["alpha"]),
            cfg_scale=float(cfg_scale if cfg_scale is not None else d["cfg_scale"]),
            cfg_interval=tuple(cfg_interval),
            method=method,
            prediction=self.metadata.get("prediction", "velocity"),
            return_trajectory=return_trajectory,
            cuda_graphs=cuda_graphs,
        )
        if return_trajectory:
            final, traj = out
            return self.to_uint8(final), torch.stack([self.to_uint8(x) for x in traj])
        return self.to_uint8(out)

    def to_uint8(self, latents: Tensor) -> UInt8[Tensor, "b h w 3"]:
        pixels = self.vae.decode(latents.float().cpu())  # [0, 1]
        return (pixels * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def load_pipeline(path: Path | str, weights: str = "ema", device: str | torch.device | None = None) -> Pipeline:
    """Build the model a checkpoint describes, with its `ema` or `raw` weights, and what it conditions on."""
    from data.pipeline.encoders import autoencoder_for
    from models.text_encoder import FrozenTextEncoder

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state, meta = read_metadata(path)
    model = checkpoint.model_from_state(state, weights).to(device)
    del state
    if meta["conditioning"] == "text":
        encoder = FrozenTextEncoder.from_config(meta["text_encoder"], device=device)
        conditioning = TextConditioning(encoder, meta["tokenizer"], dropout=0.0)
    else:
        conditioning = ClassConditioning(meta["num_classes"], meta.get("class_names"), dropout=0.0)
    vae_info = meta.get("vae") or {"id": "identity"}
    vae = autoencoder_for(vae_info, vae_info.get("name_or_path"), vae_info.get("subfolder"), device)
    return Pipeline(model, conditioning, vae, meta, device)
