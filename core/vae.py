"""The image autoencoders: images to the normalised latents the DiT trains on, and back.

Pixel convention at this interface (the one convention of the repo, core/images.py): `encode` takes and `decode`
returns float images in [0, 1], [B, 3, H, W]. Each autoencoder maps them to the range its network expects
(`pixel_range`, recorded in the dataset spec, so samplers decode with the convention the shards were encoded with).

SD3VAE stores the mean of the latent distribution, never a sample: the stored latent is then a function of the
image alone (reproducible, and a resumed shard equals a clean one), and the VAE's posterior noise is small next to
the flow's own. Latents are normalised as x1 = (z - shift) * scale.
"""

from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Float
from torch import Tensor

from core.device import default_device
from core.hub import checked_hub_id

SD3_SCALE = 1.5305
SD3_SHIFT = 0.0609


class ImageAutoencoder(Protocol):
    """What the pipeline (and later the samplers) need from a VAE."""

    channels: int
    info: dict[str, Any]

    def latent_shape(self, image_size: int) -> tuple[int, int, int]: ...
    def encode(self, images: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b c hl wl"]: ...
    def decode(self, latents: Float[Tensor, "b c hl wl"]) -> Float[Tensor, "b 3 h w"]: ...


class IdentityVAE:
    """Pixel space: the latents are the pixels mapped to [-1, 1]."""

    channels = 3

    def __init__(self) -> None:
        self.info = dict(id="identity", scale=1.0, shift=0.0, pixel_range=[-1.0, 1.0])

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        return (3, image_size, image_size)

    def encode(self, images: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b 3 h w"]:
        return images.float() * 2 - 1

    def decode(self, latents: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b 3 h w"]:
        return ((latents.float() + 1) / 2).clamp(0, 1)


def load_autoencoder(source: Any, subfolder: str | None = "vae", dtype: torch.dtype = torch.float32) -> Any:
    """A diffusers AutoencoderKL from an instance, a config dict (randomly initialised), a folder or a hub id.

    A local folder is read from `folder/subfolder` when that holds a config.json (a full pipeline checkout
    such as SD3's), else from the folder itself (a VAE saved on its own).
    """
    from diffusers import AutoencoderKL

    if isinstance(source, AutoencoderKL):
        vae = source
    elif isinstance(source, dict):
        vae = AutoencoderKL.from_config(source)
    else:
        # low_cpu_mem_usage=False: the default wants `accelerate` and warns when it is missing. trust_remote_code
        # stays off: AutoencoderKL is diffusers' own class, so no file can bring code with it.
        kwargs = dict(torch_dtype=dtype, low_cpu_mem_usage=False, trust_remote_code=False)
        path = Path(source)
        if path.is_dir():
            if subfolder and (path / subfolder / "config.json").exists():
                kwargs["subfolder"] = subfolder
            elif not (path / "config.json").exists():
                raise FileNotFoundError(f"no config.json in {path} or {path / (subfolder or '')}: not a VAE folder")
        elif subfolder:
            kwargs["subfolder"] = subfolder
        try:
            vae = AutoencoderKL.from_pretrained(str(source), **kwargs)
        except OSError as err:
            raise OSError(f"cannot load VAE {source!r} ({err}); without internet, pass a local folder") from err
    # Cast only when needed: diffusers warns on every dtype cast, even a no-op one.
    return vae if vae.dtype == dtype else vae.to(dtype=dtype)


class SD3VAE:
    """A diffusers AutoencoderKL (SD3's has 16 latent channels and 8x downsampling).

    scale / shift default to the VAE config's scaling_factor / shift_factor (1.5305 / 0.0609 for SD3).
    pixel_range: [0, 1] reproduces the reference; [-1, 1] is what the SD3 VAE was trained on.
    Runs in bfloat16 on a GPU when one is available, float32 on the CPU.
    """

    def __init__(
        self,
        vae: Any,
        subfolder: str | None = "vae",
        scale: float | None = None,
        shift: float | None = None,
        pixel_range: tuple[float, float] = (0.0, 1.0),
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vae_id: str | None = None,
    ):
        lo, hi = (float(v) for v in pixel_range)
        if not lo < hi:
            raise ValueError(f"pixel_range must be (low, high) with low < high, got {pixel_range}")
        self.device = default_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vae = load_autoencoder(vae, subfolder, self.dtype).to(self.device).eval().requires_grad_(False)
        config = self.vae.config
        self.scale = float(scale if scale is not None else config.scaling_factor)
        self.shift = float(shift if shift is not None else (config.shift_factor or 0.0))
        self.pixel_range = (lo, hi)
        self.channels = int(config.latent_channels)
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        if vae_id is None:
            vae_id = str(vae) if isinstance(vae, str | Path) else "AutoencoderKL(config)"
        self.info = dict(id=vae_id, scale=self.scale, shift=self.shift, pixel_range=[lo, hi])

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % self.factor:
            raise ValueError(f"image_size {image_size} is not a multiple of the VAE's downsampling {self.factor}")
        return (self.channels, image_size // self.factor, image_size // self.factor)

    @torch.no_grad()
    def encode(self, images: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b c hl wl"]:
        lo, hi = self.pixel_range
        # Map the range in float32: bf16 cannot hold k/255 exactly, and the input conv is cheap to feed.
        x = (images.float() * (hi - lo) + lo).to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mean
        return ((z.float() - self.shift) * self.scale).cpu()

    @torch.no_grad()
    def decode(self, latents: Float[Tensor, "b c hl wl"]) -> Float[Tensor, "b 3 h w"]:
        lo, hi = self.pixel_range
        z = latents.to(self.device, torch.float32) / self.scale + self.shift
        x = self.vae.decode(z.to(self.dtype)).sample.float()
        return ((x - lo) / (hi - lo)).clamp(0, 1).cpu()


def autoencoder_for(
    info: dict[str, Any],
    name_or_path: str | None = None,
    subfolder: str | None = "vae",
    device=None,
    override: str = "vae.name_or_path=PATH",
):
    """The autoencoder that decodes latents recorded with `info` (a dataset spec's or checkpoint's `vae`).

    Identity data decodes with IdentityVAE. Otherwise the SD3 VAE loads from `name_or_path` (the user's choice)
    or else the recorded id, which as a file's word must be a hub id (UnsafeSourceError naming `override`
    otherwise), with the recorded scale, shift and pixel range, so samples decode exactly as encoded.
    """
    if info.get("id") == "identity":
        return IdentityVAE()
    if not name_or_path and not info.get("id"):
        raise ValueError("no VAE to decode with: the recorded vae has no id and no vae.name_or_path is set")
    source = name_or_path or checked_hub_id(info.get("id"), "the recorded vae.id", override)
    return SD3VAE(
        source,
        subfolder=subfolder,
        scale=info.get("scale"),
        shift=info.get("shift"),
        pixel_range=tuple(info.get("pixel_range", (0.0, 1.0))),
        device=device,
        vae_id=str(info.get("id") or source),
    )
