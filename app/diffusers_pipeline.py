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
import math
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

# model_index.json names this repo's transformer and VAE classes by their module, app.diffusers_models. diffusers
# imports only its own libraries by such a name and takes any other module from sys.modules (importing a module a
# folder names would run its code), so that module must be imported before from_pretrained: importing it here makes
# `from app.diffusers_pipeline import RFDiTPipeline` enough, as the README shows.
import app.diffusers_models  # noqa: F401
from app import validation as checks
from app.cost import EvaluationCost
from core.images import to_uint8
from core.sampling import sampling_problem
from flow.sampler import guided_velocity, prepare_conditions

DEFAULTS = dict(steps=24, cfg_scale=4.0, alpha=1.0)
"""app/pipeline.py's sampling defaults, for a checkpoint that recorded none."""


def check_config(prediction: Any, pixel_range: Any, text_len: Any, class_names: Any, image_size: Any,
                 defaults: Any) -> None:
    """ValueError naming the model_index.json entry when what an exported folder records cannot be what
    app.export wrote: the folder is a file anyone can edit, and these values reach every call."""
    problem = sampling_problem(defaults, "model_index.json defaults")
    if problem:
        raise ValueError(problem)
    if prediction not in ("velocity", "x"):
        raise ValueError(f"model_index.json prediction is {_short(prediction)}, not 'velocity' or 'x'")
    if not (isinstance(pixel_range, list | tuple) and len(pixel_range) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pixel_range)
            and pixel_range[0] < pixel_range[1]):
        raise ValueError(f"model_index.json pixel_range is {_short(pixel_range)}; two finite numbers, low first")
    for key, value in (("text_len", text_len), ("image_size", image_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 20):
            raise ValueError(f"model_index.json {key} is {_short(value)}; a positive whole number or null")
    if class_names is not None and not (isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        raise ValueError(f"model_index.json class_names is {_short(class_names)}; a list of names or null")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


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
        defaults = DEFAULTS | dict(defaults or {})
        pixel_range = list(pixel_range or (-1.0, 1.0))
        check_config(prediction, pixel_range, text_len, class_names, image_size, defaults)
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer,
                              text_encoder=text_encoder)
        self.register_to_config(prediction=prediction, pixel_range=pixel_range, text_len=text_len,
                                class_names=class_names, image_size=image_size, defaults=defaults)
        self._offload_device: torch.device | None = None
        self.limits: checks.Limits = checks.BATCH
        """What a call accepts (app/validation.py, as Pipeline.generate): set it to raise the budget (`tflop`),
        bound the time (`time_limit`) or the prompt length (`prompt_chars`)."""
        self._cost: EvaluationCost | None = None

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

    def token_count(self, prompt: str) -> int:
        """Tokens `prompt` takes, special tokens included and not truncated."""
        return len(self.tokenizer(prompt)["input_ids"])

    def check_prompts(self, prompts: list[Any], which: str = "prompt") -> list[str]:
        """app/validation.py's prompt check of each (a non-empty string within the character limit and within
        text_len tokens: refused, never cut), as the CLI and the app check theirs."""
        length = int(self.config.text_len)
        return [checks.check_prompt(f"{which}[{i}]", p, self.limits, self.token_count, length)
                for i, p in enumerate(prompts)]

    def encode_prompt(self, prompts: list[str], device) -> dict[str, Tensor]:
        """Prompts -> {text, text_mask}: the tokenizer's ids padded to text_len, the encoder's last hidden state
        with padded positions zeroed (core/text_encoder.py). A prompt longer than text_len tokens is refused,
        as app/validation.py refuses it, rather than cut."""
        length = int(self.config.text_len)
        prompts = self.check_prompts(prompts)
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

    def _items(self, prompt, negative_prompt, class_labels, repeat: int) -> tuple[list, list | None]:
        """(the prompts or class ids, one per image, and the negative prompts or None), checked; a TypeError when
        the wrong kind is given, RequestError for a value out of range."""
        if self.is_text:
            if class_labels is not None or prompt is None:
                raise TypeError("this is a text-conditional pipeline: pass prompt=, not class_labels=")
            prompts = self.check_prompts([prompt] if isinstance(prompt, str) else list(prompt))
            prompts = [p for p in prompts for _ in range(repeat)]
            if negative_prompt is None:
                return prompts, None
            negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negatives) != len(prompts):
                negatives = [p for p in negatives for _ in range(repeat)]
            if len(negatives) != len(prompts):
                raise checks.RequestError(f"negative_prompt: {len(negatives)} prompts for {len(prompts)} images")
            return prompts, self.check_prompts(negatives, "negative_prompt")
        if prompt is not None or negative_prompt is not None or class_labels is None:
            raise TypeError("this is a class-conditional pipeline: pass class_labels=, not a prompt")
        labels = [c for c in ([class_labels] if isinstance(class_labels, int | str) else list(class_labels))
                  for _ in range(repeat)]
        try:
            return self.get_label_ids(labels), None
        except ValueError as err:
            raise checks.RequestError(str(err)) from None

    def _conditions(self, items: list, negatives: list | None, device) -> tuple[dict, dict]:
        """(cond, uncond) of checked items (`_items`)."""
        if not self.is_text:
            ids = torch.tensor(items, dtype=torch.long, device=device)
            return dict(labels=ids), self.net.null_condition(len(items), device)
        cond = self.encode_prompt(items, device)
        if negatives is None:
            return cond, self.net.null_condition(len(items), device)
        return cond, self.encode_prompt(negatives, device)

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
        [b, 3, h, w] tensor in [0, 1] ("pt").

        Checked first, as the CLI and the app check theirs (app/validation.py, against `self.limits` widened to the
        checkpoint's defaults): finite steps and guidance in range, prompts non-empty and within the tokenizer's
        length, labels in range, sizes positive multiples of the model's unit, the cost within the budget; the
        time limit while drawing. RequestError (a ValueError) names the argument."""
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        names, d = checks.DIFFUSERS, self.config.defaults
        limits = self.limits.covering(d)
        settings = checks.check_settings(
            names, limits, d["steps"] if num_inference_steps is None else num_inference_steps,
            d["cfg_scale"] if guidance_scale is None else guidance_scale, (0.0, 1.0), d["alpha"], "euler")
        repeat = checks.check_number("num_images_per_prompt=", num_images_per_prompt, limits.num_images, integer=True)
        items, negatives = self._items(prompt, negative_prompt, class_labels, repeat)
        n = checks.check_count(names.num_images, len(items), limits)
        h, w = self._size(height, width)
        device = self._execution_device
        checks.check_budget(names, limits, device, h, w, settings.steps, n, "euler", settings.cfg_scale != 1.0,
                            self.evaluation_flops(h, w))
        cond, uncond = self._conditions(items, negatives, device)
        x = self._initial_latents(n, h, w, generator, latents, device)
        with self._resident("transformer"), checks.time_limit(self.transformer, limits.time_limit, names.time_limit):
            x = self._denoise(x, cond, uncond, settings.steps, settings.cfg_scale, device)
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

    def _size(self, height, width) -> tuple[int, int]:
        """(height, width) in pixels: None is the trained size, anything else a positive multiple of the unit."""
        _, patch, side = self._input_geometry()
        size = int(self.config.image_size or side * self.vae_scale_factor)
        detail = f"patch {patch} x VAE factor {self.vae_scale_factor}"
        return checks.check_size(checks.DIFFUSERS, height, width, self.vae_scale_factor * patch, size, detail)

    def evaluation_flops(self, height: int, width: int) -> int:
        """Floating-point operations of one transformer evaluation on one image of height x width pixels
        (app/cost.py: counted on a weightless copy, once per size)."""
        if self._cost is None:
            stock = isinstance(self.transformer, PixArtTransformer2DModel)
            config = self.transformer.config
            channels, _, _ = self._input_geometry()

            def build():
                if stock:
                    return PixArtTransformer2DModel.from_config(config)
                from models import build_model

                return build_model(config)

            def run(model, h: int, w: int) -> None:
                meta = torch.device("meta")
                net = StockPixArt(model, int(self.config.text_len), int(config.caption_channels
                                  or config.cross_attention_dim)) if stock else model
                net(torch.zeros(1, channels, h, w, device=meta), torch.zeros(1, device=meta),
                    **net.null_condition(1, meta))

            self._cost = EvaluationCost(build, run)
        return self._cost(height // self.vae_scale_factor, width // self.vae_scale_factor)

    def _initial_latents(self, n: int, h: int, w: int, generator, latents, device) -> Tensor:
        """The starting noise [n, c, h, w] in float32 for (h, w) pixels: `latents`, or drawn by diffusers'
        randn_tensor (one generator per image draws each image's noise alone, as app/sample.py's seeds do)."""
        channels, _, _ = self._input_geometry()
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
