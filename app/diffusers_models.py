"""This repo's networks as diffusers models [vonplaten2022diffusers]: save_pretrained / from_pretrained, safetensors.

    from app.diffusers_models import RFDiTTransformer2DModel
    model = RFDiTTransformer2DModel.from_pretrained("exported", subfolder="transformer")   # any family
    model(x, t, text=..., text_mask=...)                                                    # this repo's contract

Each family's class is the family itself with diffusers' ModelMixin and ConfigMixin mixed in, not a wrapper
around it: the parameters keep the names checkpoints and reparameterize.py use (a `safetensors` file written
here and a training checkpoint's `ema` hold the same keys), the object is a models.base.DiffusionTransformer
(flow/sampler.py samples it as it is), and diffusers sees a ModelMixin (dtype, device, `.to`, pipelines). Its
diffusers config is one entry, `architecture`: the ModelConfig fields (models/config.py), so a config field
added later needs nothing here.

One clash is settled here: the families keep their ModelConfig in `self.config`, which ConfigMixin reserves for
its own record. `config` is therefore the ModelConfig on these classes, and diffusers' record (what config.json
holds) stays in `_internal_dict`, where ConfigMixin reads and writes it.

`IdentityAutoencoder` is pixel space's VAE as a diffusers component (no weights), so a pixel-space pipeline has
the same parts as a latent one.
"""

from typing import Any, ClassVar

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.utils import is_accelerate_available
from jaxtyping import Float
from torch import Tensor

from models import FAMILIES, DiffusionTransformer, ModelConfig
from models.ccdit import CCDiT
from models.joint_dit import JointDiT
from models.mmdit import MMDiT
from models.pixart import PixArt
from models.pixeldit import PixelDiT


class RFDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """A DiffusionTransformer of any family as a diffusers model. `from_pretrained` on this class reads the
    family from config.json and returns that family's class; `from_model` wraps a built model's weights."""

    config_name = "config.json"
    family_class: ClassVar[type[DiffusionTransformer] | None] = None

    @register_to_config
    def __init__(self, architecture: dict[str, Any]):
        if self.family_class is None:
            raise TypeError("RFDiTTransformer2DModel is built through its family's class: use from_pretrained, "
                            "from_config or from_model")
        self.family_class.__init__(self, ModelConfig(**architecture))
        self._gradient_checkpointing_func = None  # ModelMixin.__init__'s one attribute (its __init__ is not run)

    @property
    def config(self) -> ModelConfig:
        try:
            return self.__dict__["_model_config"]
        except KeyError:  # before the family's __init__ has set it
            raise AttributeError("config") from None

    @config.setter
    def config(self, value: ModelConfig) -> None:
        self.__dict__["_model_config"] = value

    @classmethod
    def family_for(cls, architecture: dict[str, Any]) -> type["RFDiTTransformer2DModel"]:
        family = architecture.get("family") if isinstance(architecture, dict) else None
        if family not in TRANSFORMERS:
            raise ValueError(f"config.json: architecture.family is {family!r}, not one of {', '.join(TRANSFORMERS)}")
        return TRANSFORMERS[family]

    @classmethod
    def from_config(cls, config: dict[str, Any] | None = None, **kwargs):
        if cls.family_class is None and config is not None:
            cls = cls.family_for(dict(config).get("architecture"))
        return super().from_config(config, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        kwargs.setdefault("low_cpu_mem_usage", is_accelerate_available())  # else diffusers warns that it is missing
        if cls.family_class is None:
            keys = ("subfolder", "revision", "cache_dir", "local_files_only", "token")
            config = cls.load_config(pretrained_model_name_or_path, **{k: kwargs[k] for k in keys if k in kwargs})
            cls = cls.family_for(config.get("architecture"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @classmethod
    def from_model(cls, model: DiffusionTransformer) -> "RFDiTTransformer2DModel":
        """The diffusers model of `model`'s family holding `model`'s tensors (shared, not copied: built on the meta
        device and then assigned), in eval mode when `model` is."""
        target = cls.family_for(model.config.to_dict())
        with torch.device("meta"):
            wrapped = target(architecture=model.config.to_dict())
        wrapped.load_state_dict(model.state_dict(), strict=True, assign=True)
        return wrapped.train(model.training)


class CCDiTTransformer2DModel(RFDiTTransformer2DModel, CCDiT):
    family_class = CCDiT


class MMDiTTransformer2DModel(RFDiTTransformer2DModel, MMDiT):
    family_class = MMDiT


class JointDiTTransformer2DModel(RFDiTTransformer2DModel, JointDiT):
    family_class = JointDiT


class PixelDiTTransformer2DModel(RFDiTTransformer2DModel, PixelDiT):
    family_class = PixelDiT


class PixArtRFTransformer2DModel(RFDiTTransformer2DModel, PixArt):
    """This repo's pixart family (its t and velocity). For the stock class, export --format pixart."""

    family_class = PixArt


TRANSFORMERS: dict[str, type[RFDiTTransformer2DModel]] = {
    family: next(c for c in (CCDiTTransformer2DModel, MMDiTTransformer2DModel, JointDiTTransformer2DModel,
                             PixelDiTTransformer2DModel, PixArtRFTransformer2DModel) if c.family_class is model_class)
    for family, model_class in FAMILIES.items()
}
"""Family -> its diffusers class (pixeldit and mmpixeldit share PixelDiT's)."""


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """Pixel space as a diffusers VAE: `decode(z).sample` is z itself (the pixels in the model's pixel_range, the
    pipeline's config); scaling_factor and shift_factor are AutoencoderKL's fields, 1 and 0 here."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, latent_channels: int = 3, scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        # One empty buffer, so ModelMixin's dtype and device (read from the module's tensors) have an answer.
        self.register_buffer("anchor", torch.zeros(0), persistent=False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, subfolder: str | None = None, **kwargs):
        """From config.json alone: there are no weights (save_pretrained writes no weights file for an empty state
        dict). Loading options such as torch_dtype have nothing to act on."""
        keys = ("revision", "cache_dir", "local_files_only", "token")
        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder,
                                 **{k: kwargs[k] for k in keys if k in kwargs})
        return cls.from_config(config)

    def encode(self, images: Float[Tensor, "b c h w"]) -> Float[Tensor, "b c h w"]:
        return images

    def decode(self, latents: Float[Tensor, "b c h w"], return_dict: bool = True):
        return DecoderOutput(sample=latents) if return_dict else (latents,)
