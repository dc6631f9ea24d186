"""RFDiTPipeline: an exported checkpoint (python -m app.export) as a diffusers DiffusionPipeline.

    from app.diffusers_pipeline import RFDiTPipeline
    pipe = RFDiTPipeline.from_pretrained("exported")
    image = pipe("a large red circle in the top left on a gray background", generator=torch.manual_seed(0)).images[0]

The parts are diffusers' and transformers' own: `transformer` (app/diffusers_models.py: any family, or for a pixart
export stock diffusers' PixArtTransformer2DModel), `scheduler` (FlowMatchEulerDiscreteScheduler with shift = the
checkpoint's alpha), `vae` (AutoencoderKL, or IdentityAutoencoder in pixel space; scaling_factor and shift_factor
are the recorded latent scale and shift), and for text checkpoints `tokenizer` and `text_encoder`. What has no
component lives in the pipeline's config (model_index.json): the prediction type, the pixel range the VAE decodes
to, the tokenizer length, the class names and the sampling defaults the checkpoint recorded.

Sampling is app/sample.py's, step for step: the same conditioning (captions zero-padded past their mask; the
unconditional input is the model's null condition, not an encoded empty prompt, unless negative_prompt is given),
classifier-free guidance in one batched forward (flow/sampler.py: guided_velocity), and Euler steps on the
alpha-warped grid, taken by the scheduler: with shift = alpha and sigmas linspace(1, 1/N, N), its sigmas are
1 - t' for this repo's grid t' = t / (t + alpha (1 - t)), and its step x + (sigma' - sigma) (noise - data) is
this repo's x + (t' - t) v. With one generator per image (`generator=[torch.Generator().manual_seed(s) ...]`),
image i is app/sample.py's image with seed s (tests/test_diffusers_export.py: equal to 1/255).
"""

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import is_accelerate_available
from diffusers.utils.torch_utils import randn_tensor
from jaxtyping import Bool, Float
from PIL import Image
from torch import Tensor

from core.images import to_uint8
from flow.sampler import guided_velocity, prepare_conditions

DEFAULTS = dict(steps=24, cfg_scale=4.0, alpha=1.0)
"""app/pipeline.py's sampling defaults, for a checkpoint that recorded none."""


class StockPixArt:
    """Stock diffusers PixArtTransformer2DModel (a `--format pixart` export) called with this repo's contract:
    model(x, t, text=, text_mask=) -> velocity, from timestep = 1000 (1 - t) and the negated output."""

    condition_keys = ("text", "text_mask")

    def __init__(self, transformer: PixArtTransformer2DModel, text_len: int, text_dim: int):
        self.transformer, self.text_len, self.text_dim = transformer, text_len, text_dim

    def __call__(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        out = self.transformer(x.to(self.transformer.dtype), encoder_hidden_states=text.to(self.transformer.dtype),
                               encoder_attention_mask=text_mask, timestep=(1 - t) * 1000).sample
        return -out.float()

    def null_condition(self, n: int, device) -> dict[str, Tensor]:
        return dict(text=torch.zeros(n, self.text_len, self.text_dim, device=device, dtype=self.transformer.dtype),
                    text_mask=torch.zeros(n, self.text_len, dtype=torch.bool, device=device))


class RFDiTPipeline(DiffusionPipeline):
    """Text or class-conditional sampling from an exported checkpoint; see the module docstring."""

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["tokenizer", "text_encoder"]

    def __init__(
        self,
        transformer,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae,
        tokenizer=None,
        text_encoder=None,
        prediction: str = "velocity",
        pixel_range: list[float] | None = None,
        text_len: int | None = None,
        class_names: list[str] | None = None,
        image_size: int | None = None,
        defaults: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer,
                              text_encoder=text_encoder)
        self.register_to_config(prediction=prediction, pixel_range=list(pixel_range or (-1.0, 1.0)),
                                text_len=text_len, class_names=class_names, image_size=image_size,
                                defaults=DEFAULTS | dict(defaults or {}))
        self._offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # else diffusers warns that it is missing
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---- what the parts say -------------------------------------------------------------------------------

    @property
    def is_text(self) -> bool:
        return self.text_encoder is not None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2 ** (levels - 1) for an AutoencoderKL, 1 in pixel space."""
        levels = getattr(self.vae.config, "block_out_channels", None)
        return 2 ** (len(levels) - 1) if levels else 1

    @property
    def net(self):
        """The velocity model (this repo's contract): the transformer, or the stock PixArt adapter."""
        if isinstance(self.transformer, PixArtTransformer2DModel):
            dim = self.transformer.config.caption_channels or self.transformer.config.cross_attention_dim
            return StockPixArt(self.transformer, int(self.config.text_len), int(dim))
        return self.transformer

    @property
    def _execution_device(self) -> torch.device:
        return self._offload_device or super()._execution_device

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device: torch.device | str = "cuda") -> None:
        """Keep every part on the CPU and move each to `device` only while it runs (text encoder, then transformer,
        then VAE), as diffusers' model offload does; written here so that it needs no `accelerate`."""
        device = torch.device(device)
        self._offload_device = torch.device(device.type, gpu_id if gpu_id is not None else device.index or 0) \
            if device.type != "cpu" else device
        self.to("cpu")

    @contextlib.contextmanager
    def _resident(self, name: str) -> Iterator[None]:
        """Component `name` on the execution device for the block (and back on the CPU after, when offloading)."""
        module = getattr(self, name)
        if self._offload_device is None or module is None:
            yield
            return
        module.to(self._offload_device)
        try:
            yield
        finally:
            module.to("cpu")

    # ---- conditioning -------------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], device) -> dict[str, Tensor]:
        """Prompts -> {text, text_mask}: the tokenizer's ids padded to text_len, the encoder's last hidden state
        with padded positions zeroed (core/text_encoder.py). A prompt longer than text_len tokens is refused,
        as app/validation.py refuses it, rather than cut."""
        length = int(self.config.text_len)
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
            used = len(self.tokenizer(prompt)["input_ids"])
            if used > length:
                raise ValueError(f"prompt {prompt[:60]!r} takes {used} tokens; this model reads {length}")
        ids = self.tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        mask: Bool[Tensor, "b l"] = ids["attention_mask"].bool().to(device)
        with self._resident("text_encoder"):
            out = self.text_encoder(input_ids=ids["input_ids"].long().to(device), attention_mask=mask.long())
        hidden: Float[Tensor, "b l e"] = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return dict(text=hidden.masked_fill(~mask[..., None], 0.0).to(self.transformer.dtype), text_mask=mask)

    def get_label_ids(self, labels: list[int | str]) -> list[int]:
        """Class labels as ids: an index (the null class, num_classes, included) or a recorded class name."""
        names = list(self.config.class_names or [])
        ids = []
        for label in labels:
            if isinstance(label, str):
                if label not in names:
                    raise ValueError(f"class label {label!r} is not one of {names}")
                label = names.index(label)
            ids.append(label)
        return self.transformer.check_labels(ids, "class_labels")

    def _conditions(self, prompt, negative_prompt, class_labels, repeat: int, device) -> tuple[dict, dict, int]:
        """(cond, uncond, batch) for a text or a class checkpoint; a TypeError when the wrong one is given."""
        if self.is_text:
            if class_labels is not None or prompt is None:
                raise TypeError("this is a text-conditional pipeline: pass prompt=, not class_labels=")
            prompts = [p for p in ([prompt] if isinstance(prompt, str) else list(prompt)) for _ in range(repeat)]
            cond = self.encode_prompt(prompts, device)
            if negative_prompt is None:
                return cond, self.net.null_condition(len(prompts), device), len(prompts)
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                negatives = [p for p in negatives for _ in range(repeat)]
            return cond, self.encode_prompt(negatives, device), len(prompts)
        if prompt is not None or negative_prompt is not None or class_labels is None:
            raise TypeError("this is a class-conditional pipeline: pass class_labels=, not a prompt")
        labels = [c for c in ([class_labels] if isinstance(class_labels, int | str) else list(class_labels))
                  for _ in range(repeat)]
        ids = torch.tensor(self.get_label_ids(labels), dtype=torch.long, device=device)
        return dict(labels=ids), self.net.null_condition(len(labels), device), len(labels)

    # ---- sampling -----------------------------------------------------------------------------------------

    def _grid(self, steps: int, device) -> None:
        """The scheduler's sigmas on this repo's warped grid (see the module docstring)."""
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps), device=device)
        else:
            self.scheduler.set_timesteps(steps, device=device)

    def decode(self, latents: Float[Tensor, "b c h w"]) -> Float[Tensor, "b 3 H W"]:
        """Latents -> [0, 1] pixels: un-normalise, decode, and map the VAE's pixel_range to [0, 1] (core/vae.py)."""
        lo, hi = (float(v) for v in self.config.pixel_range)
        cfg = self.vae.config
        with self._resident("vae"):
            z = latents.float() / float(cfg.scaling_factor) + float(getattr(cfg, "shift_factor", None) or 0.0)
            x = self.vae.decode(z.to(self.vae.dtype).to(self._execution_device)).sample.float()
        return ((x - lo) / (hi - lo)).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        class_labels: int | str | list[int | str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Images for `prompt` (text) or `class_labels` (class). Steps and guidance default to the checkpoint's;
        height and width (pixels, multiples of patch x VAE factor) to its training size. Returns
        ImagePipelineOutput(images=...): PIL images, a [b, h, w, 3] float array in [0, 1] ("np") or a
        [b, 3, h, w] tensor in [0, 1] ("pt")."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        d = self.config.defaults
        steps = int(d["steps"] if num_inference_steps is None else num_inference_steps)
        scale = float(d["cfg_scale"] if guidance_scale is None else guidance_scale)
        device = self._execution_device
        cond, uncond, n = self._conditions(prompt, negative_prompt, class_labels, num_images_per_prompt, device)
        x = self._initial_latents(n, height, width, generator, latents, device)
        with self._resident("transformer"):
            x = self._denoise(x, cond, uncond, steps, scale, device)
        images = self.decode(x)
        if output_type == "pt":
            out: Any = images.cpu()
        elif output_type == "np":
            out = images.permute(0, 2, 3, 1).cpu().numpy()
        else:
            out = [Image.fromarray(a) for a in to_uint8(images.cpu()).numpy()]
        return ImagePipelineOutput(images=out) if return_dict else (out,)

    def _input_geometry(self) -> tuple[int, int, int]:
        """(channels, patch, input side) of the transformer, this repo's or stock PixArt's."""
        cfg = self.transformer.config
        if isinstance(self.transformer, PixArtTransformer2DModel):
            return int(cfg.in_channels), int(cfg.patch_size), int(cfg.sample_size)
        return int(cfg.in_channels), int(cfg.patch), int(cfg.input_size)

    def _initial_latents(self, n: int, height, width, generator, latents, device) -> Tensor:
        """The starting noise [n, c, h, w] in float32: `latents`, or drawn by diffusers' randn_tensor (one
        generator per image draws each image's noise alone, as app/sample.py's seeds do)."""
        channels, patch, side = self._input_geometry()
        size = int(self.config.image_size or side * self.vae_scale_factor)
        h, w = height or size, width or size
        unit = self.vae_scale_factor * patch
        if h % unit or w % unit:
            raise ValueError(f"height and width must be multiples of {unit} pixels (patch x VAE factor), "
                             f"got {h} x {w}")
        shape = (n, channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(device, torch.float32)
        return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)

    def _denoise(self, x: Tensor, cond: dict, uncond: dict, steps: int, scale: float, device) -> Tensor:
        net = self.net
        cond, uncond = prepare_conditions(net, cond, uncond)  # an mmDiT's caption keys and values, once
        self._grid(steps, device)
        prediction = self.config.prediction
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            t = 1.0 - self.scheduler.sigmas[i]
            v = guided_velocity(net, x, t, cond, uncond, scale, prediction=prediction)
            x = self.scheduler.step(-v.float(), timestep, x, return_dict=False)[0]  # diffusers: noise - data
        return x
