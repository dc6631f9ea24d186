"""A trained checkpoint as an image generator: everything it needs comes from the checkpoint's metadata.

    pipe = load_pipeline("outputs/embedded/stage5/checkpoints/step_00000150.pt")
    images = pipe.generate(prompts=["a large red circle in the top left on a gray background"], seeds=[0])

The model family and size, the prediction type, the text encoder and tokenizer (text checkpoints) or the
class names (class checkpoints), and the VAE with the scale, shift and pixel range the training latents
were encoded with are all recorded by the trainer, so no flag repeats them. Used by app/sample.py, the
Gradio app and evaluation/evaluate.py; the training previews share the same sampler (flow/sampler.py).

What the metadata names is loaded only as a hub id or the bundled MiniLM, never with remote code, unless the user
says otherwise (`Sources`, app/sources.py); every request is checked by app/validation.py before it is drawn.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import UInt8
from torch import Tensor

from app import validation as checks
from app.cost import EvaluationCost
from app.sources import Sources, UnsafeSourceError, text_encoder_config, tokenizer_source, vae_source
from core import checkpoint
from core.conditioning import ClassConditioning, TextConditioning
from core.device import default_device
from core.hub import is_bundled, is_hub_id
from core.images import to_uint8
from flow import sample
from models import ModelConfig, build_model

CheckpointError = checkpoint.CheckpointError
"""A file that is not a usable checkpoint of this repository; the message names it and what is wrong."""


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint file; a training run's folder or its checkpoints/ folder stands for its newest checkpoint
    (core/checkpoint.py: resolve), which must be a single file: a sharded one is named with the command that writes
    its single-file form."""
    try:
        return checkpoint.resolve(path, "--model-path", single_file=True)
    except FileNotFoundError as err:
        raise CheckpointError(str(err)) from None


def _unreadable(path: Path, err: Exception) -> str:
    """Why torch.load refused a file, without torch's text: for a file that is not a plain checkpoint, that text
    advises loading it with weights_only=False, which would run whatever code the file holds."""
    inner = err.__cause__ or err
    return (f"--model-path {path}: not a readable checkpoint (torch's safe loader refused it with "
            f"{type(inner).__name__}: not a PyTorch checkpoint, a damaged one, or one holding more than tensors "
            "and plain values)")


def read_metadata(path: Path | str) -> tuple[dict[str, Any], checkpoint.CheckpointMetadata]:
    """(the whole checkpoint, its typed metadata record); CheckpointError names the file and what is missing."""
    path = resolve_checkpoint(path)
    try:
        state = checkpoint.load(path)  # weights_only=True
    except CheckpointError as err:
        raise CheckpointError(_unreadable(path, err)) from err
    return state, checkpoint.read_metadata(state, f"--model-path {path}")


def run_sampler(model: torch.nn.Module, noise: Tensor, cond: dict, uncond: dict | None, **settings) -> Tensor:
    """flow.sample as every front end runs it, and scripts/bench/sample.py times it: the model in the dtype of its
    weights (app/precision.py: bf16 on CUDA), fed inputs of that dtype, the ODE state in float32."""
    dtype = next(model.parameters()).dtype
    return sample(model, noise, cond, uncond, model_dtype=None if dtype == torch.float32 else dtype, **settings)


@dataclass
class Pipeline:
    model: torch.nn.Module
    conditioning: ClassConditioning | TextConditioning
    vae: Any
    record: checkpoint.CheckpointMetadata
    """The checkpoint's typed metadata (core/checkpoint.py)."""
    device: torch.device
    limits: checks.Limits = checks.BATCH
    """What `generate` accepts (app/validation.py); the CLI raises the budget with --max-tflop."""
    _cost: EvaluationCost | None = field(default=None, init=False, repr=False)
    lora: dict[str, Any] | None = None
    """The LoRA adapter merged into the model (folder, scale), if any (load_pipeline's `lora`)."""

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's dtype (app/precision.py)."""
        return next(self.model.parameters()).dtype

    def autocast(self):
        """A context for running `model` on float32 inputs elsewhere (a validation loss): bf16 autocast for a bf16
        model, nothing for a float32 one."""
        from contextlib import nullcontext

        return nullcontext() if self.dtype == torch.float32 else torch.autocast(self.device.type, self.dtype)

    @property
    def metadata(self) -> dict[str, Any]:
        """The checkpoint's metadata as recorded (a plain dict, for display)."""
        return self.record.to_dict()

    @property
    def is_text(self) -> bool:
        return isinstance(self.conditioning, TextConditioning)

    @property
    def image_size(self) -> int:
        return int(self.record.image_size or self.model.config.input_size)

    @property
    def vae_factor(self) -> int:
        """Image pixels per latent pixel: 8 for SD3 latents, 1 in pixel space."""
        return self.image_size // self.model.config.input_size

    @property
    def size_unit(self) -> int:
        """Heights and widths are multiples of this many pixels: one patch of latents."""
        return self.vae_factor * self.model.config.patch

    @property
    def buckets(self) -> list[tuple[int, int]]:
        """(height, width) sizes in pixels to offer, tallest first, the trained square among them: the aspect-ratio
        buckets the checkpoint records it was trained on (metadata `buckets`, as a manifest lists them), else
        PixArt-alpha's rule at its resolution (data/buckets.py) in steps of its size unit. Any other multiple of
        the unit samples too (`generate(height=, width=)`)."""
        from data.buckets import bucket_table

        recorded = self.record.extra.get("buckets")
        if isinstance(recorded, dict) and recorded:
            sizes = {tuple(int(v) for v in b["size"]) for b in recorded.values()}
        else:
            unit, side = self.size_unit, self.image_size
            step = -(-max(unit, side // 16) // unit) * unit  # S / 16 rounded up to a multiple of the unit
            sizes = {(b.height, b.width) for b in bucket_table(side, step)}
        sizes.add((self.image_size, self.image_size))
        return sorted(sizes, key=lambda hw: (-hw[0] / hw[1], hw[0]))

    def defaults(self) -> dict[str, Any]:
        """Sampling settings the checkpoint's stage previewed with (steps, cfg_scale, alpha; checked against
        core/sampling.py's caps when the checkpoint was read)."""
        return dict(steps=24, cfg_scale=4.0, alpha=1.0) | dict(self.record.sampling or {})

    def evaluation_flops(self, height: int, width: int) -> int:
        """Floating-point operations of one evaluation of the transformer on one image of height x width pixels
        (app/cost.py: counted on a weightless copy of the model, once per size)."""
        if self._cost is None:
            cfg, conditioning = self.model.config, self.conditioning

            def run(model, h: int, w: int) -> None:
                meta = torch.device("meta")
                model(torch.zeros(1, cfg.in_channels, h, w, device=meta), torch.zeros(1, device=meta),
                      **conditioning.null(1, meta))

            self._cost = EvaluationCost(lambda: build_model(cfg), run)
        return self._cost(height // self.vae_factor, width // self.vae_factor)

    def check_budget(self, names: checks.Names, limits: checks.Limits, height: int, width: int, steps: int,
                     images: int, method: str, cfg_scale: float) -> float:
        """app/validation.py's budget check of a request with this model's cost; returns its teraFLOP."""
        return checks.check_budget(names, limits, self.device, height, width, steps, images, method,
                                   cfg_scale != 1.0, self.evaluation_flops(height, width))

    def prompt_length(self, prompt: str) -> int:
        """Tokens `prompt` takes with the checkpoint's tokenizer, special tokens included and not truncated.
        The text encoder reads only the first `conditioning.max_length`; front ends use this to refuse a longer
        prompt instead of dropping its end silently."""
        if not self.is_text:
            raise ValueError("prompt_length needs a text-conditional checkpoint")
        return self.conditioning.token_count(prompt)

    def check_prompt(self, name: str, prompt: Any, limits: checks.Limits | None = None, chars_name: str = "") -> str:
        """app/validation.py's prompt check with this checkpoint's tokenizer and length."""
        return checks.check_prompt(name, prompt, limits or self.limits, self.prompt_length,
                                   self.conditioning.max_length, chars_name)

    def check_size(self, names: checks.Names, height: Any, width: Any) -> tuple[int, int]:
        """(height, width) in pixels, None meaning the trained size; RequestError unless multiples of the unit."""
        detail = f"patch {self.model.config.patch} x VAE factor {self.vae_factor}"
        return checks.check_size(names, height, width, self.size_unit, self.image_size, detail)

    def noise(self, seeds: list[int], size: int | tuple[int, int] | None = None) -> Tensor:
        """One noise image per seed from its own generator: a sample depends on its seed only, not on the
        batch it is drawn in. `size`: the model's input side, or (height, width), in latent pixels."""
        cfg: ModelConfig = self.model.config
        h, w = (size, size) if isinstance(size, int) else size or (cfg.input_size, cfg.input_size)
        return torch.stack(
            [torch.randn(cfg.in_channels, h, w, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        ).to(self.device)

    def _items(self, prompts: Any, labels: Any, names: checks.Names, limits: checks.Limits) -> list[str] | list[int]:
        """The prompts (text) or labels (class), each checked."""
        if self.is_text:
            if prompts is None or labels is not None:
                raise checks.RequestError("this is a text-conditional checkpoint: pass prompts=, not labels=")
            if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
                raise checks.RequestError(f"prompts= must be a list of strings, got {type(prompts).__name__}")
            checked: dict[str, str] = {}  # a prompt repeated for several seeds is tokenized once
            for i, prompt in enumerate(prompts):
                if not (isinstance(prompt, str) and prompt in checked):
                    checked[prompt] = self.check_prompt(names.prompt.format(i=i), prompt, limits, names.prompt_chars)
            return [checked[p] for p in prompts]
        if labels is None or prompts is not None:
            raise checks.RequestError("this is a class-conditional checkpoint: pass labels=, not prompts=")
        return checks.check_labels(names.label, list(labels), self.conditioning.null_label)

    def _condition(self, items: list[str] | list[int]) -> dict[str, Tensor]:
        if self.is_text:
            return self.conditioning.from_prompts(items, self.device)
        return self.conditioning.from_labels(items, self.device)

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
        height: int | None = None,
        width: int | None = None,
        return_trajectory: bool = False,
        cuda_graphs: bool = False,
        names: checks.Names = checks.PYTHON,
        limits: checks.Limits | None = None,
    ) -> UInt8[Tensor, "b h w 3"] | tuple[UInt8[Tensor, "b h w 3"], UInt8[Tensor, "n b h w 3"]]:
        """Images as uint8 [b, h, w, 3], one per prompt (text) or label (class) with its seed; with
        `return_trajectory` also the decoded states on the time grid [steps + 1, b, h, w, 3]. `height` / `width`
        in pixels (None: the trained size). `cuda_graphs` (CUDA only) replays the transformer from CUDA graphs
        (flow/sampler.py); worth it for repeated calls.

        Everything is checked first (app/validation.py) against `limits` (default: the pipeline's), widened to
        the checkpoint's own defaults: the cost within its budget (teraFLOP), and while drawing its time limit;
        RequestError, a ValueError, names the setting as `names` spells it (RequestTimeout when stopped)."""
        d = self.defaults()
        limits = (limits or self.limits).covering(d)
        settings = checks.check_settings(
            names, limits, d["steps"] if steps is None else steps, d["cfg_scale"] if cfg_scale is None else cfg_scale,
            cfg_interval, d["alpha"] if alpha is None else alpha, method,
        )
        h, w = self.check_size(names, height, width)
        items = self._items(prompts, labels, names, limits)
        n = checks.check_count(names.num_images, len(items), limits)
        seeds = list(range(n)) if seeds is None else list(seeds)
        if len(seeds) != n:
            raise checks.RequestError(f"{len(seeds)} seeds for {n} images")
        seeds = checks.check_seeds(names.seed, seeds, limits)
        self.check_budget(names, limits, h, w, settings.steps, n, settings.method, settings.cfg_scale)
        if cuda_graphs and limits.time_limit is not None:
            raise checks.RequestError(f"{names.time_limit} cannot stop a replay of CUDA graphs: drop one of the two")
        size = (h // self.vae_factor, w // self.vae_factor)
        with checks.time_limit(self.model, limits.time_limit, names.time_limit):
            out = run_sampler(
                self.model,
                self.noise(seeds, size),
                self._condition(items),
                self.conditioning.null(n, self.device),
                steps=settings.steps,
                alpha=settings.alpha,
                cfg_scale=settings.cfg_scale,
                cfg_interval=settings.cfg_interval,
                method=settings.method,
                prediction=self.record.prediction,
                return_trajectory=return_trajectory,
                cuda_graphs=cuda_graphs,
            )
        if return_trajectory:
            final, traj = out
            return self.to_uint8(final), torch.stack([self.to_uint8(x) for x in traj])
        return self.to_uint8(out)

    def to_uint8(self, latents: Tensor) -> UInt8[Tensor, "b h w 3"]:
        """Latents -> uint8 images through the checkpoint's VAE (core/images.py's convention)."""
        return to_uint8(self.vae.decode(latents.float().cpu()))


def _one_line(err: BaseException, limit: int = 400) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class _Plan:
    """Where each loader will read from, settled before anything loads (app/sources.py)."""

    text_encoder: dict[str, Any] | None
    tokenizer: tuple[str, str | None] | None
    vae: tuple[str | None, str | None]


def _plan(path: Path, meta: checkpoint.CheckpointMetadata, sources: Sources) -> _Plan:
    try:
        vae = vae_source(meta.vae or {"id": "identity"}, sources)
        if meta.conditioning != "text":
            return _Plan(None, None, vae)
        tok = meta.tokenizer
        if not isinstance(tok, dict) or not all(isinstance(tok.get(k), int) and tok[k] > 0
                                                for k in ("max_length", "vocab_size")):
            raise CheckpointError(f"--model-path {path}: metadata.tokenizer must hold max_length and vocab_size "
                                  f"(positive whole numbers), got {_one_line(repr(tok), 200)}")
        return _Plan(text_encoder_config(meta.text_encoder, sources), tokenizer_source(meta.tokenizer, sources), vae)
    except UnsafeSourceError as err:
        raise CheckpointError(f"--model-path {path}: {err}") from err


def _text_conditioning(path: Path, meta: checkpoint.CheckpointMetadata, plan: _Plan, sources: Sources,
                       device: torch.device) -> TextConditioning:
    """The tokenizer and text encoder the plan names, checked against each other and against the tokenizer the
    checkpoint records."""
    from core.text_encoder import FrozenTextEncoder
    from core.tokenizer import TextTokenizer, check_tokenizer, describe_tokenizer

    recorded = meta.tokenizer
    tok_source, revision = plan.tokenizer
    which = f"--tokenizer {tok_source}" if sources.tokenizer else f"the recorded tokenizer {tok_source!r}"
    try:
        tokenizer = TextTokenizer(tok_source, int(recorded["max_length"]), revision)
        check_tokenizer(recorded, tokenizer)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"--model-path {path}: {which}: {_one_line(err)}") from err
    enc_cfg = plan.text_encoder
    which = (f"--text-encoder {sources.text_encoder}" if sources.text_encoder
             else f"the recorded text encoder {enc_cfg['name_or_path'] or 'bundled MiniLM'!r}")
    try:
        encoder = FrozenTextEncoder.from_config(enc_cfg, device=device)
    except (OSError, ValueError) as err:
        hint = ("; it ships its own code: pass --trust-remote-code only if you trust it"
                if "trust_remote_code" in str(err) and not sources.trust_remote_code else "")
        raise CheckpointError(f"--model-path {path}: {which}: cannot load it ({_one_line(err)}){hint}") from err
    embeds = encoder.encoder.get_input_embeddings().num_embeddings
    if tokenizer.vocab_size > embeds:
        raise CheckpointError(
            f"--model-path {path}: tokenizer {describe_tokenizer(tokenizer.info)} has {tokenizer.vocab_size} ids but "
            f"{which} embeds {embeds}: they do not belong together"
        )
    if not sources.allow_other_text_encoder:
        _check_encoder_identity(path, meta, encoder, which)
    return TextConditioning(encoder, recorded, dropout=0.0, tokenizer=tokenizer)


def _recorded_encoder(meta: checkpoint.CheckpointMetadata) -> tuple[dict[str, Any] | None, str]:
    """(the identity of the encoder the checkpoint trained with, the key it is under), or (None, "") when the
    checkpoint records none that can be compared: an older record naming a local path and no hash. Stored-feature
    runs record the encoder that made the features (metadata.text_features.encoder), others the one they ran."""
    from core.text_encoder import BUNDLED_ENCODER

    features = meta.extra.get("text_features")
    if isinstance(features, dict) and isinstance(features.get("encoder"), dict):
        ident, key = dict(features["encoder"]), "metadata.text_features.encoder"
    elif isinstance(meta.text_encoder_info, dict):
        ident, key = dict(meta.text_encoder_info), "metadata.text_encoder_info"
    else:
        return None, ""
    name = ident.get("id")
    if not isinstance(name, str):
        return None, ""
    if is_bundled(name):  # older records hold the bundled MiniLM's path
        ident["id"] = BUNDLED_ENCODER
    comparable = ident.get("sha256") or ident["id"] == BUNDLED_ENCODER or ident["id"].startswith("sha256:") \
        or is_hub_id(ident["id"])
    return (ident, key) if comparable else (None, "")


def _check_encoder_identity(path: Path, meta: checkpoint.CheckpointMetadata, encoder, which: str) -> None:
    """CheckpointError naming both encoders when the loaded one is not the one the checkpoint trained with (by
    weights when both sides have their hash, else by id, subfolder and revision: core/text_encoder.py)."""
    from core.text_encoder import describe_encoder, same_encoder

    recorded, key = _recorded_encoder(meta)
    if recorded is None or encoder.identity is None or same_encoder(recorded, encoder.identity):
        return
    raise CheckpointError(
        f"--model-path {path}: {which} is {_one_line(describe_encoder(encoder.identity), 200)}, but the checkpoint "
        f"was trained with {_one_line(describe_encoder(recorded), 200)} ({key}): prompts would not be encoded as in "
        "training. Pass --text-encoder with that encoder, or --allow-other-text-encoder to sample anyway"
    )


def load_pipeline(
    path: Path | str,
    weights: str = "ema",
    device: str | torch.device | None = None,
    sources: Sources | None = None,
    limits: checks.Limits | None = None,
    fp32: bool = False,
    lora: tuple[Path | str, float] | None = None,
) -> Pipeline:
    """Build the model a checkpoint describes (a file, a run folder or its checkpoints/ folder: the newest), with
    its `ema` or `raw` weights, and what it conditions on. `sources`: the user's own text encoder, tokenizer or VAE
    and whether remote code may run (app/sources.py). `limits`: what `generate` accepts (default BATCH). The model
    is bfloat16 on CUDA and float32 on a CPU or with `fp32` (app/precision.py). `lora`: (an adapter folder or LoRA
    run folder, scale): the adapter merged into the weights at that scale (core/lora.py), checked to be one trained
    for this network."""
    from app.precision import inference_dtype
    from core.vae import autoencoder_for

    if weights not in ("ema", "raw"):
        raise ValueError(f"weights must be 'ema' or 'raw', got {weights!r}")
    sources = sources or Sources()
    device = default_device(device)
    path = resolve_checkpoint(path)
    state, meta = read_metadata(path)
    plan = _plan(path, meta, sources)  # a name a checkpoint may not use is refused before anything loads
    meta.check_not_adapter(f"--model-path {path}")
    model = checkpoint.model_from_state(state, weights, f"--model-path {path}")
    merged = None
    if lora is not None:
        model, merged = _with_lora(model, checkpoint.model_weights(state, weights), meta, *lora)
    model = model.to(device, inference_dtype(device, fp32))
    del state
    if meta.conditioning == "text":
        conditioning = _text_conditioning(path, meta, plan, sources, device)
    else:
        conditioning = ClassConditioning(meta.num_classes, meta.class_names, dropout=0.0)
    vae_from, vae_subfolder = plan.vae
    try:
        vae = autoencoder_for(meta.vae or {"id": "identity"}, vae_from, vae_subfolder, device)
    except (OSError, ValueError) as err:
        which = f"--vae {sources.vae}" if sources.vae else f"the recorded VAE {vae_from!r}"
        raise CheckpointError(f"--model-path {path}: {which}: cannot load it ({_one_line(err)})") from err
    return Pipeline(model, conditioning, vae, meta, device, limits or checks.BATCH, merged)


def _with_lora(model: torch.nn.Module, base_weights: dict[str, Tensor], meta: checkpoint.CheckpointMetadata,
               folder: Path | str, scale: float) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with a LoRA adapter merged in at `scale`, and what the pipeline records of it."""
    import math

    from core import lora as core_lora

    if not (isinstance(scale, int | float) and math.isfinite(scale)):
        raise CheckpointError(f"--lora-scale {scale!r}: expected a finite number")
    adapter = core_lora.read_adapter(folder)
    core_lora.check_fits(adapter, model, base_weights, "--lora")
    if adapter.record is not None and adapter.record.prediction != meta.prediction:
        raise CheckpointError(f"--lora {adapter.folder}: trained for a model predicting {adapter.record.prediction!r}, "
                              f"this checkpoint predicts {meta.prediction!r}")
    merged = core_lora.apply_adapter(model, adapter, scale, merge=True)
    return merged.eval().requires_grad_(False), dict(folder=str(adapter.folder), scale=float(scale))
