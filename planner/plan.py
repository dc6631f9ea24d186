"""Memory planner: what one GPU holds for a training configuration, before anything is launched.

    python -m planner [stage=N] [any override a training command takes] [+gpus=8] [+gpu_memory_gb=80]

It composes the stage's config as train_stageN.py does (so every override is accepted and an unknown key fails
with Hydra's message), builds the DiT on the meta device, counts the per-GPU bytes of parameters, gradients,
optimizer and EMA in closed form, measures the saved activations per sample on the CPU as a GPU would hold them
(planner/activation_memory.py) at the data's largest bucket, adds the frozen text encoder (none with stored text
features: the step reads them from the shards), the VAE and a fixed allowance, and prints a table
and the settings it would choose: activation checkpointing off when the configured micro-batch fits without it,
else on; the largest micro-batch that fits; the train.grad_accum that keeps train.batch_size.

`check_memory(cfg, world_size, device)` is the same plan for the trainer to call at start on CUDA; it raises
`MemoryPlanError` (the table and the keys to change) when the run cannot fit, unless train.memory_check=false.

train.parallel decides the shard group (`shard_degree`): 1 for ddp, every GPU for fsdp, train.hsdp_shard_size (or
+gpus_per_node, default 8) for hsdp. Sharded, parameters, gradients, optimizer and EMA are divided by it
(`state_bytes`), DDP's buckets go, and FSDP's unsharded working copies come in (`fsdp_working_bytes`).
A LoRA run (train.lora.rank > 0, trainer/lora.py) trains the adapters alone: gradients, DDP buckets, AdamW and the EMA
are the adapters' (`trainable`), and the frozen base counts once, as weights, at 2 bytes a parameter with bf16
compute (it is stored in bf16) and 4 otherwise; sharded, the EMA holds its own shard of the base as well
(`state_bytes`' `frozen`).
`step_traffic` is the bytes one GPU sends per optimizer step for each mode, from the ring algorithms' costs
[patarasuk2009]; docs/SCALING.md (scripts/figures/scaling.py) turns them into time against NVLink and InfiniBand.
"""

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from core.cli_help import HelpFormatter
from trainer.errors import UserError

if TYPE_CHECKING:
    from planner.activation_memory import ActivationProfile

GIB = 2**30
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_GPUS = 8
DEFAULT_GPUS_PER_NODE = 8
DEFAULT_GPU_MEMORY_GB = 80.0
ALLOWANCE_GIB = 4.0
"""CUDA context (about 0.5-1 GiB), cuBLAS / cuDNN workspaces, NCCL's buffers and the caching allocator's rounding:
a fixed allowance, not a measurement."""

# Frozen models the plan does not build: parameter counts, with where each comes from.
TEXT_ENCODER_PARAMETERS = {
    "google/t5gemma-xl-xl-ul2": (
        1_682_114_560,
        "transformers' T5GemmaEncoderModel on the meta device with T5 v1.1 XL shapes (2048 wide, 24 layers, "
        "32 heads of 64, FF 5120, 256k vocabulary), not a download; with those shapes the encoder-decoder has the "
        "3,766,980,608 parameters keras-hub's preset t5gemma_xl_xl_ul2 lists",
    ),
    "google/t5-v1_1-xxl": (
        4_762_310_656,
        "transformers' T5EncoderModel on the meta device with T5 v1.1 XXL's config (4096 wide, 24 layers, 64 heads, "
        "FF 10240, vocabulary 32128)",
    ),
}
VAE_PARAMETERS = {
    "sd3": (
        83_819_683,
        "diffusers' AutoencoderKL on the meta device with SD3's VAE config (16 latent channels, blocks "
        "128/256/512/512, 2 layers each, no quant convs)",
    ),
}
LATENT_SPACES = {"sd3": (16, 8), "identity": (3, 1)}  # vae.kind -> (channels, downsampling factor)
NOT_COUNTED = ("allocator fragmentation beyond the allowance, NCCL buffers of large jobs, torch.compile and "
               "Transformer Engine workspaces and FP8 weight copies, gradient tensors alive during the backward, "
               "the VAE decode of previews (between steps, when no activations are held); under fsdp/hsdp, the whole "
               "model and EMA each rank builds before sharding them, and the whole copy rank 0 gathers for previews "
               "and held losses (both outside the step); with LoRA, the activations are measured on the plain model "
               "(the adapters save their inputs and A x where the frozen base layers no longer need theirs)")


class MemoryPlanError(UserError, RuntimeError):
    """The configured run does not fit the GPU; the message is the plan's table and the keys to change."""


# ---------------------------------------------------------------------------------- closed forms


def state_bytes(parameters: int, fused_wgrad: int = 0, world_size: int = 1, shard_degree: int = 1, frozen: int = 0,
                frozen_bytes: int = 4) -> dict[str, int]:
    """Per-GPU bytes of the training state of `parameters` fp32 master weights, beside `frozen` parameters held in
    `frozen_bytes` each that are never trained (a LoRA run's base: no gradient, optimizer state or DDP bucket; the
    EMA shares them unsharded, and holds its own shard of them sharded).

    shard_degree 1 is DDP: every GPU holds a full copy, plus DDP's flat fp32 buckets, into which it copies each
    gradient for the all-reduce (gradient_as_bucket_view is off), for every weight DDP manages (not the
    `fused_wgrad` weights, whose fp32 main_grad trainer/main_grad.py reduces itself and aliases as .grad, so they
    count once, as gradients). A sharded mode divides parameters, gradients, optimizer and EMA by `shard_degree`.
    """
    if shard_degree < 1 or world_size % shard_degree:
        raise ValueError(f"shard_degree={shard_degree} must be >= 1 and divide the world size {world_size}")
    share = math.ceil(parameters / shard_degree)
    frozen_share = frozen_bytes * math.ceil(frozen / shard_degree)
    ddp = shard_degree == 1 and world_size > 1
    return dict(parameters=4 * share + frozen_share, gradients=4 * share,
                ddp_buckets=4 * (parameters - fused_wgrad) if ddp else 0, optimizer=8 * share,
                ema=4 * share + (frozen_share if shard_degree > 1 else 0))


def shard_degree(cfg, world_size: int, gpus_per_node: int | None = None) -> int:
    """How many GPUs share one copy of the training state under train.parallel (see the module docstring)."""
    mode = cfg.train.parallel
    if mode == "ddp":
        return 1
    if mode == "fsdp":
        return world_size
    size = cfg.train.hsdp_shard_size or min(gpus_per_node or DEFAULT_GPUS_PER_NODE, world_size)
    if world_size % size:
        raise ValueError(f"train.hsdp_shard_size={size} does not divide {world_size} GPUs")
    return int(size)


def fsdp_working_bytes(root: int, largest_block: int, param_bytes: int) -> int:
    """FSDP2's unsharded working copies on one GPU at the peak, the backward of a block: the root's parameters
    (all-gathered once, kept until the backward ends), two blocks' parameters (the one computing and the next,
    prefetched), and two blocks' gradients, each in the compute dtype and once more in fp32 as the reduce-scatter's
    input (the one reducing while the next computes). An estimate from FSDP2's design, not a measurement."""
    return root * param_bytes + 2 * largest_block * param_bytes + 2 * largest_block * (param_bytes + 4)


def step_traffic(parameters: int, mode: str, gpus: int, shard: int, grad_accum: int, param_bytes: int,
                 root: int = 0) -> dict[str, int]:
    """Bytes one GPU sends per optimizer step, by collective, for the ring algorithms [patarasuk2009]: over n ranks
    an all-reduce of S bytes sends 2 (n-1)/n S, an all-gather or a reduce-scatter (n-1)/n S.

    ddp: one all-reduce of the fp32 gradients per step (no_sync while accumulating). fsdp (shard = gpus): per
    micro-batch, all-gathers of the compute-dtype parameters for the forward and again for the backward (blocks
    are freed after their forward; the root's `root` parameters are not) and a reduce-scatter of fp32 gradients.
    hsdp: the same within each shard group per micro-batch, and one all-reduce of each rank's fp32 gradient shard
    across the gpus / shard replicas per step. Keys: `intra` for collectives within a shard group (a node),
    `inter` for those across groups; a collective over more GPUs than a node crosses the network either way."""
    ring = lambda n: (n - 1) / n  # noqa: E731
    if mode == "ddp":
        return dict(all_reduce=int(2 * ring(gpus) * 4 * parameters))
    gather = (2 * parameters - root) * param_bytes  # forward, then backward without the root
    per_micro = dict(all_gather=ring(shard) * gather, reduce_scatter=ring(shard) * 4 * parameters)
    out = {k: int(grad_accum * v) for k, v in per_micro.items()}
    if mode == "hsdp" and gpus > shard:
        replicas = gpus // shard
        out["all_reduce"] = int(2 * ring(replicas) * 4 * math.ceil(parameters / shard))
    return out


# ---------------------------------------------------------------------------------- what the config describes


@dataclass(frozen=True)
class DataShape:
    latent_shape: tuple[int, int, int]
    source: str
    kind: str | None = None  # labels | text, when a manifest says
    text_len: int | None = None
    num_classes: int | None = None
    sizes: tuple[tuple[int, int], ...] = ()
    """The latent (height, width) of every bucket the run trains on (data.buckets, or all the manifest lists);
    empty without buckets: latent_shape's."""
    text_features: bool = False
    """The shards store the text encoder's states (data/features.py)."""

    def latent_sizes(self) -> tuple[tuple[int, int], ...]:
        return self.sizes or (tuple(self.latent_shape[1:]),)


def data_shape(cfg) -> DataShape:
    """The latent shape from data.path's manifest.json when it is a shard folder (with its buckets and whether it
    stores text features), else from data.image_size."""
    from omegaconf import OmegaConf

    from data.shards import ShardError, read_manifest

    path = None if OmegaConf.is_missing(cfg.data, "path") else cfg.data.path
    if path is not None and Path(path).is_dir():
        try:
            spec = read_manifest(path)[1]
        except ShardError as err:
            raise ValueError(f"data.path={path!r}: {err}") from err
        text_len = spec.tokenizer["max_length"] if spec.tokenizer else None
        chosen = cfg.data.buckets
        sizes = tuple(tuple(b["latent_shape"][1:]) for name, b in (spec.buckets or {}).items()
                      if chosen is None or name in chosen)
        return DataShape(tuple(spec.latent_shape), f"{path}/manifest.json", spec.kind, text_len, spec.num_classes,
                         sizes, spec.text_features is not None)
    size = cfg.data.image_size
    where = "???" if path is None else repr(path)
    if size is None:
        raise ValueError(f"no data shape: data.path={where} is not a shard folder with manifest.json and "
                         "data.image_size is null; set data.path=/path/to/shards or data.image_size=256 (pixels)")
    if cfg.vae.kind not in LATENT_SPACES:
        raise ValueError(f"vae.kind={cfg.vae.kind!r}: expected one of {', '.join(LATENT_SPACES)}")
    channels, factor = LATENT_SPACES[cfg.vae.kind]
    if int(size) % factor:
        raise ValueError(f"data.image_size={size} is not a multiple of the {cfg.vae.kind} VAE's downsampling {factor}")
    side = int(size) // factor
    note = "" if path is None else f", data.path={where} not found"
    return DataShape((channels, side, side), f"data.image_size={size}, vae={cfg.vae.kind}{note}")


def plan_model_config(cfg, data: DataShape):
    """The ModelConfig the trainer would build (trainer/builders.py), with the input fields from `data`."""
    from omegaconf import OmegaConf

    from models import model_config
    from trainer.builders import model_conditioning, model_input_size

    m = cfg.model
    c, h, w = data.latent_shape
    fields = dict(in_channels=c, input_size=model_input_size(h, w, m.patch), conditioning=model_conditioning(cfg))
    if fields["conditioning"] == "class":
        if data.num_classes:
            fields["num_classes"] = data.num_classes
    else:
        fields |= dict(text_dim=int(cfg.text_encoder.hidden_size),
                       text_len=int(data.text_len or cfg.text_encoder.max_length))
    overrides = OmegaConf.to_container(m.overrides, resolve=True) or {}
    return model_config(**dict(family=m.family, size=m.size, patch=m.patch) | fields | overrides)


def text_encoder_parameters(enc: dict) -> tuple[int | None, str]:
    """(parameters, source) of the frozen encoder: from a local config built on the meta device (the bundled
    MiniLM, a folder, the Hugging Face cache), else the table; (None, why) when unknown."""
    from core.text_encoder import default_text_encoder_path

    name = enc["name_or_path"]
    if name is None:
        return _encoder_parameters(default_text_encoder_path(), enc["subfolder"]), \
            "the bundled MiniLM's config, built on the meta device"
    if Path(name).is_dir():
        return _encoder_parameters(name, enc["subfolder"]), f"{name}'s config, built on the meta device"
    if name in TEXT_ENCODER_PARAMETERS:
        return TEXT_ENCODER_PARAMETERS[name]
    try:
        return _encoder_parameters(name, enc["subfolder"]), "its config in the Hugging Face cache, on meta"
    except (OSError, ValueError):  # not cached, or a model type transformers does not know
        return None, f"{name}: not in the plan's table nor in the local Hugging Face cache; NOT COUNTED"


def _encoder_parameters(name_or_path: str, subfolder: str | None) -> int:
    """Parameters of what core/text_encoder.py keeps of a checkpoint (the encoder), built on the meta device."""
    import copy

    import torch
    import transformers
    from transformers import AutoConfig, AutoModel

    from core.text_encoder import _encoder_only_class  # the same choice of class as the loader makes

    config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, **({"subfolder": subfolder}
                                                                                  if subfolder else {}))
    cls_name = _encoder_only_class(str(getattr(config, "model_type", "")))
    with torch.device("meta"):
        if cls_name is not None and hasattr(transformers, cls_name):
            config = copy.deepcopy(config)
            config.is_encoder_decoder = False  # as the loader does for T5Gemma; no effect on T5's encoder class
            model = getattr(transformers, cls_name)(config)
        elif config.is_encoder_decoder:
            model = AutoModel.from_config(config).get_encoder()
        else:
            model = AutoModel.from_config(config)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Setting:
    micro: int
    grad_accum: int
    checkpointing: bool

    def overrides(self) -> str:
        return f"train.activation_checkpointing={str(self.checkpointing).lower()} train.grad_accum={self.grad_accum}"


@dataclass(frozen=True)
class Row:
    name: str
    bytes: int
    how: str
    source: str = ""  # where a count comes from, printed under the table


@dataclass
class Plan:
    """Per-GPU memory of a configuration at any micro-batch; `setting` is the configured one."""

    title: str
    state_rows: list[Row]  # parameters, gradients, DDP buckets, optimizer, EMA
    frozen_rows: list[Row]  # text encoder, VAE, the allowance
    profile: "ActivationProfile"
    tokens: int
    gpu_bytes: int
    gpu_label: str
    gpus: int
    batch_size: int
    setting: Setting
    checkpointable: bool
    fp8_compile: str | None = None  # with precision.fp8: train.compile, whose effect the report notes

    def activation_row(self, s: Setting) -> Row:
        p, n = self.profile, self.tokens
        total = p.bytes(s.micro, n, s.checkpointing)
        outside = _mib(p.outside.per_sample(n))
        if s.checkpointing:
            inputs, block = _mib(p.kept.per_sample(n) - p.outside.per_sample(n)), _mib(p.block.per_sample(n))
            rest = _gib(total - s.micro * p.checkpointed_per_sample(n))
            how = (f"checkpointed: {s.micro} x ({p.depth} block inputs {inputs} + one block recomputed {block} + "
                   f"outside the blocks {outside}) MiB + {rest} GiB for any batch")
        else:
            pixel = f"{p.pixel_depth} pixel blocks x {_mib(p.pixel_block.per_sample(n))} + " if p.pixel_depth else ""
            how = (f"{s.micro} x {_mib(p.full.per_sample(n))} MiB ({p.depth} blocks x {_mib(p.block.per_sample(n))} + "
                   f"{pixel}outside the blocks {outside}) + {_gib(p.full.fixed(n))} GiB for any batch")
        return Row(f"activations, micro-batch {s.micro} (measured)", total, how)

    def rows(self, s: Setting | None = None) -> list[Row]:
        rows = (*self.state_rows, self.activation_row(s or self.setting), *self.frozen_rows)
        return [r for r in rows if r.bytes or r.source]  # no empty DDP row on one GPU

    def total(self, s: Setting | None = None) -> int:
        return sum(r.bytes for r in self.rows(s))

    def fits_with(self, s: Setting) -> bool:
        return self.total(s) <= self.gpu_bytes

    @property
    def fits(self) -> bool:
        return self.fits_with(self.setting)

    def per_gpu_batch(self) -> int:
        return self.batch_size // self.gpus

    def largest_micro(self, checkpointing: bool) -> int | None:
        """The largest micro-batch dividing the per-GPU batch that fits, or None. Memory grows with the micro-batch,
        so the largest that fits is found by bisection, then the largest divisor below it: a few dozen plans and
        at most sqrt(per-GPU batch) divisions, whatever train.batch_size is."""
        per_gpu = self.per_gpu_batch()
        fits = lambda micro: self.fits_with(Setting(micro, per_gpu // micro, checkpointing))  # noqa: E731
        if per_gpu < 1 or not fits(1):
            return None
        low, high = 1, per_gpu  # fits(low); the answer is in [low, high]
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if fits(middle) else (low, middle - 1)
        return largest_divisor_at_most(per_gpu, low)

    def choice(self) -> Setting | None:
        """Checkpointing off if the configured micro-batch fits without it, else on (where the family can be
        checkpointed); the largest micro-batch that fits."""
        checkpointing = self.checkpointable and not self.fits_with(replace(self.setting, checkpointing=False))
        micro = self.largest_micro(checkpointing)
        return None if micro is None else Setting(micro, self.per_gpu_batch() // micro, checkpointing)

    def table(self, s: Setting | None = None) -> str:
        s = s or self.setting
        lines = ["| per GPU (rank 0) | GiB | how |", "|---|---:|---|"]
        lines += [f"| {r.name} | {r.bytes / GIB:.2f} | {r.how} |" for r in self.rows(s)]
        lines.append(f"| **total** | **{self.total(s) / GIB:.2f}** | |")
        lines.append(f"| GPU memory | {self.gpu_bytes / GIB:.2f} | {self.gpu_label} |")
        lines += ["", *(f"- {r.name}: {r.source}" for r in self.rows(s) if r.source)]
        return "\n".join(lines)

    def report(self) -> str:
        s = self.setting
        gpus = f"{self.gpus} GPU{'s' if self.gpus > 1 else ''}"
        out = [self.title, f"train.batch_size {self.batch_size} = micro-batch {s.micro} x {gpus} x "
               f"train.grad_accum {s.grad_accum}; activation checkpointing {'on' if s.checkpointing else 'off'}",
               "", self.table(), ""]
        spare = (self.gpu_bytes - self.total()) / GIB
        out.append(f"As configured: {'fits' if spare >= 0 else 'DOES NOT FIT'} "
                   f"({abs(spare):.2f} GiB {'to spare' if spare >= 0 else 'over'}).")
        choice = self.choice()
        if choice is None:
            how = "with activation checkpointing" if self.checkpointable else "(this family cannot be checkpointed)"
            out.append(f"Nothing fits on {gpus}: not even a micro-batch of 1 {how}. Use more or larger GPUs, or a "
                       "smaller model.")
        else:
            reason = ("the configured micro-batch does not fit without it" if choice.checkpointing
                      else "the configured micro-batch fits without it" if self.fits_with(
                          replace(s, checkpointing=False)) else "this family cannot be checkpointed")
            out.append(f"Planner: activation checkpointing {'on' if choice.checkpointing else 'off'} ({reason}); "
                       f"largest micro-batch that fits: {choice.micro}, so train.grad_accum={choice.grad_accum} "
                       f"keeps train.batch_size={self.batch_size} ({self.total(choice) / GIB:.2f} GiB). Overrides:")
            out.append(f"    {choice.overrides()}" + ("   (as configured)" if choice == s else ""))
            if choice.checkpointing and self.largest_micro(False):
                alt = self.largest_micro(False)
                alt_setting = Setting(alt, self.per_gpu_batch() // alt, False)
                out.append(f"Or without checkpointing (no recompute, ~1/3 less compute per sample), micro-batch {alt}:")
                out.append(f"    {alt_setting.overrides()}")
        from trainer.fast_path import fp8_compile_note

        note = fp8_compile_note(self.fp8_compile, (choice or s).checkpointing) if self.fp8_compile else None
        if note:
            out.append(f"{note}.")
        out.append(f"Not counted: {NOT_COUNTED}.")
        return "\n".join(out)


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of n that is <= cap (cap >= 1), in O(min(cap, sqrt n)) divisions: the divisors above
    sqrt(n) are n // i for the divisors i below it, the larger the smaller i is."""
    if cap >= n:
        return n
    root = math.isqrt(n)
    if cap <= root:
        return next(d for d in range(cap, 0, -1) if n % d == 0)
    small = 1
    for i in range(1, root + 1):
        if n % i == 0:
            if n // i <= cap:
                return n // i
            small = i
    return small


def make_plan(cfg, world_size: int, gpu_bytes: int | None = None, gpu_label: str | None = None,
              te_available: bool = True, gpus_per_node: int | None = None) -> Plan:
    """The plan of `cfg` on `world_size` GPUs of `gpu_bytes` each (None: 80 GB), sharded as train.parallel says
    (hsdp without train.hsdp_shard_size: groups of `gpus_per_node`, default 8)."""
    import torch

    from core import lora as core_lora
    from models import build_model
    from models.linear import KEEP_HIGH_PRECISION, fp8_filter, plan_conversion
    from planner.activation_memory import measure_profile
    from trainer.builders import micro_batch_size
    from trainer.lora import LoraSettings

    t = cfg.train
    micro = micro_batch_size(int(t.batch_size), world_size, int(t.grad_accum))
    data = data_shape(cfg)
    mcfg = plan_model_config(cfg, data)
    with torch.device("meta"):
        model = build_model(mcfg)
        lora = LoraSettings.from_config(t.get("lora"))
        if lora.enabled:
            core_lora.inject(model, lora.peft_config(mcfg))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    params = trainable + frozen
    fused = 0
    pr = cfg.precision
    # A frozen base accumulates no weight gradient, and the adapters stay nn.Linear (trainer/lora.py).
    if pr.fp8 and pr.fuse_wgrad_accumulation and te_available and not lora.enabled:
        keep = pr.keep_high_precision
        chosen, _ = plan_conversion(model, fp8_filter(KEEP_HIGH_PRECISION if keep is None else keep))
        fused = sum(layer.weight.numel() for _, layer in chosen)
    degree = shard_degree(cfg, world_size, gpus_per_node)
    bf16 = pr.compute == "bf16"
    state = state_bytes(trainable, fused, world_size, degree, frozen, 2 if bf16 else 4)
    state_rows = _state_rows(model, trainable, fused, state, degree, 2 if bf16 else 4, frozen)
    profile = measure_profile(mcfg, bf16=bf16, prediction=t.prediction)
    if t.activation_checkpointing and not profile.checkpointable:
        raise ValueError(f"train.activation_checkpointing=true: trainer/fast_path.py checkpoints `model.blocks`, "
                         f"which model.family={mcfg.family} does not have; set it to false")
    # The step's peak is at the data's largest token count (a bucket may hold more tokens than the square).
    h, w = max(data.latent_sizes(), key=lambda hw: (hw[0] // mcfg.patch) * (hw[1] // mcfg.patch))
    tokens = (h // mcfg.patch) * (w // mcfg.patch)
    c = data.latent_shape[0]
    buckets = f", the largest of {len(data.sizes)} buckets" if data.sizes else ""
    precision = "bf16 autocast, fp32 master weights" if bf16 else "fp32"
    lora_note = f" (LoRA rank {lora.rank}: {trainable:,} trained, the rest frozen)" if lora.enabled else ""
    title = (f"Memory plan, stage {cfg.stage}: {mcfg.name}, {params:,} parameters{lora_note}; {c}x{h}x{w} latents "
             f"({tokens} tokens{buckets}) from {data.source}; {_gpus(world_size, degree, t.parallel)}; "
             f"{precision}{'; fp8' if pr.fp8 else ''}")
    label = gpu_label or f"{DEFAULT_GPU_MEMORY_GB:g} GB (default; +gpu_memory_gb=...)"
    return Plan(title=title, state_rows=state_rows, frozen_rows=frozen_rows(cfg, mcfg, data), profile=profile,
                tokens=tokens,
                gpu_bytes=int(gpu_bytes if gpu_bytes is not None else DEFAULT_GPU_MEMORY_GB * 1e9), gpu_label=label,
                gpus=world_size, batch_size=int(t.batch_size),
                setting=Setting(micro, int(t.grad_accum), t.activation_checkpointing),
                checkpointable=profile.checkpointable, fp8_compile=t.compile if pr.fp8 and te_available else None)


def _state_rows(model, params: int, fused: int, state: dict[str, int], degree: int, param_bytes: int,
                frozen: int = 0) -> list[Row]:
    """Parameters, gradients, DDP's buckets, AdamW, EMA, and (sharded) FSDP's unsharded working copies. `params`:
    the trained ones; `frozen`: a LoRA run's base (weights only, in the compute dtype)."""
    from trainer.fast_path import blocks_of

    sharded = f" / {degree} (sharded)" if degree > 1 else ""
    per = f"{params:,} x {{}} B" + sharded
    grads_how = per.format(4) + (f"; {fused:,} of them as te.Linear's fp32 main_grad" if fused else "")
    base = f"{frozen:,} x {param_bytes} B{sharded}"
    rows = [
        Row("parameters (fp32 master weights)" if not frozen else
            f"parameters (fp32 adapters; frozen base in {'bf16' if param_bytes == 2 else 'fp32'})",
            state["parameters"], per.format(4) + (f" + frozen {base}" if frozen else "")),
        Row("gradients (fp32)", state["gradients"], grads_how + ("; none for the frozen base" if frozen else "")),
        Row("DDP gradient buckets (fp32)", state["ddp_buckets"],
            f"{params - fused:,} x 4 B: DDP all-reduces a flat copy of each gradient"),
        Row("optimizer (AdamW, two fp32 moments)", state["optimizer"],
            per.format(8) + ("; none for the frozen base" if frozen else "")),
        Row("EMA (fp32 copy)", state["ema"], per.format(4) + (
            "" if not frozen else f" + its own shard of the base {base}" if degree > 1 else
            "; shares the frozen base with the model")),
    ]
    if degree > 1:
        blocks = [sum(p.numel() for p in b.parameters()) for b in blocks_of(model)]
        root, largest = params + frozen - sum(blocks), max(blocks)
        rows.append(Row("FSDP unsharded working copies", fsdp_working_bytes(root, largest, param_bytes),
                        f"root {root:,} + 2 blocks of {largest:,} parameters x {param_bytes} B, 2 blocks' gradients "
                        f"x ({param_bytes} + 4) B", "an estimate from FSDP2's all-gather / reduce-scatter scheme "
                        "(planner/plan.py: fsdp_working_bytes), not a measurement"))
    return rows


def frozen_rows(cfg, mcfg, data: DataShape | None = None) -> list[Row]:
    """The frozen text encoder (text stages that encode their captions; with stored text features the step reads
    the shards' states and previews load the encoder on the CPU, trainer/builders.py) and the VAE rank 0 decodes
    previews with."""
    import torch
    from omegaconf import OmegaConf

    rows = []
    if mcfg.conditioning == "text":
        enc = OmegaConf.to_container(cfg.text_encoder, resolve=True)
        dtype = getattr(torch, enc["dtype"])  # from_config's dtype on CUDA
        name = enc["name_or_path"] or "bundled MiniLM"
        if data is not None and data.text_features and cfg.data.text_features is not False:
            rows.append(Row("text encoder", 0, f"{name}: not on the GPU (the shards' stored text features; previews "
                            "encode their prompts on the CPU)", "data.text_features=false would load it"))
        else:
            count, source = text_encoder_parameters(enc)
            how = f"{name}, {count:,} x {dtype.itemsize} B" if count else f"{name}: NOT COUNTED"
            rows.append(Row(f"text encoder (frozen, {str(dtype).removeprefix('torch.')})",
                            (count or 0) * dtype.itemsize, how, source))
    if cfg.vae.kind in VAE_PARAMETERS:
        count, source = VAE_PARAMETERS[cfg.vae.kind]
        rows.append(Row("VAE (rank 0 only: previews; bfloat16)", 2 * count, f"{cfg.vae.kind}, {count:,} x 2 B", source))
    rows.append(Row("CUDA context, workspaces", int(ALLOWANCE_GIB * GIB), "a fixed allowance, not measured",
                    "CUDA context (about 0.5-1 GiB), cuBLAS / cuDNN workspaces, NCCL buffers, allocator rounding"))
    return rows


def check_memory(cfg, world_size: int, device) -> Plan | None:
    """The plan of the configured run on `device` (its memory on CUDA). Raises MemoryPlanError when the run cannot
    fit; returns None without planning when train.memory_check is false."""
    if not cfg.train.memory_check:
        return None
    import torch

    from models.linear import te_unavailable_reason

    device = torch.device(device)
    gpu_bytes = label = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu_bytes, label = props.total_memory, f"{props.name} ({device})"
    import os

    plan = make_plan(cfg, world_size, gpu_bytes, label, te_available=te_unavailable_reason(device) is None,
                     gpus_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", DEFAULT_GPUS_PER_NODE)))
    if not plan.fits:
        raise MemoryPlanError(f"{plan.report()}\n(train.memory_check=false skips this check)")
    return plan


# ---------------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m planner",
        formatter_class=HelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + (
            "arguments (key=value, in any order):\n"
            "  stage=N            1..5 or stageN: composes configs/stageN.yaml, as train_stageN.py does (default 5)\n"
            f"  +gpus=G            world size (default {DEFAULT_GPUS})\n"
            f"  +gpus_per_node=K   hsdp's shard group without train.hsdp_shard_size (default {DEFAULT_GPUS_PER_NODE})\n"
            "  +gpu_memory_gb=M   memory of one GPU in GB of 1e9 bytes (default: the CUDA device's when there is\n"
            f"                     one, else {DEFAULT_GPU_MEMORY_GB:g})\n"
            "  any other          a Hydra override, as for training: train.batch_size=10240 experiment=embedded ...\n\n"
            f"Adds a fixed {ALLOWANCE_GIB:g} GiB allowance for the CUDA context and workspaces.\n"
            "examples:\n  python -m planner stage=2\n"
            "  python -m planner stage=2 train.batch_size=10240 +gpus=8 +gpu_memory_gb=141\n"
            "  python -m planner stage=2 train.parallel=hsdp +gpus=64 +gpus_per_node=8"),
    )
    parser.add_argument("words", nargs="*", metavar="key=value", help="stage=N, +gpus=G, +gpu_memory_gb=M, overrides")
    return parser


def split_arguments(args: list[str]) -> tuple[int, int, float | None, list[str]]:
    """(stage, gpus, gpu_memory_gb, Hydra overrides) from the command line's key=value words."""
    stage, gpus, memory, overrides = 5, DEFAULT_GPUS, None, []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "stage":
            digits = value.removeprefix("stage")
            if digits not in {"1", "2", "3", "4", "5"}:
                raise ValueError(f"stage={value}: expected 1..5 or stage1..stage5")
            stage = int(digits)
        elif key.lstrip("+") == "gpus":
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{arg}: expected a whole number of GPUs >= 1")
            gpus = int(value)
        elif key.lstrip("+") == "gpu_memory_gb":
            try:
                memory = float(value)
            except ValueError:
                memory = -1.0
            if not (math.isfinite(memory) and 0 < memory <= 1e6):  # nan passes `<= 0`; inf overflows int()
                raise ValueError(f"{arg}: expected a positive, finite number of GB (at most 1e6)")
        else:
            overrides.append(arg)
    return stage, gpus, memory, overrides


def compose(stage: int, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return hydra_compose(config_name=f"stage{stage}", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    words = _parser().parse_args(argv).words  # --help answers here, before torch is imported
    per_node = [w for w in words if w.lstrip("+").startswith("gpus_per_node=")]
    words = [w for w in words if w not in per_node]
    try:
        gpus_per_node = int(per_node[-1].partition("=")[2]) if per_node else None
        if gpus_per_node is not None and gpus_per_node < 1:
            raise ValueError
    except ValueError:
        print(f"planner: {per_node[-1]}: expected a whole number of GPUs >= 1", file=sys.stderr)
        return 2
    try:
        stage, gpus, memory, overrides = split_arguments(words)
    except ValueError as err:
        print(f"planner: {err}", file=sys.stderr)
        return 2
    from hydra.errors import HydraException

    from trainer.config import check_keys, check_ranges

    try:
        cfg = compose(stage, overrides)
        check_keys(cfg)  # a `+key` the schema does not have would otherwise be planned as if absent
        check_ranges(cfg)
    except (HydraException, ValueError) as err:
        print(f"planner: {err}", file=sys.stderr)
        return 2
    import torch

    label = None
    if memory is not None:
        gpu_bytes, label = int(memory * 1e9), f"{memory:g} GB (+gpu_memory_gb)"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu_bytes, label = props.total_memory, f"{props.name} (cuda:0)"
    else:
        gpu_bytes = None
    try:
        plan = make_plan(cfg, gpus, gpu_bytes, label, gpus_per_node=gpus_per_node)
    except ValueError as err:
        print(f"planner: {err}", file=sys.stderr)
        return 2
    print(plan.report())
    return 0 if plan.choice() is not None else 1


def _gpus(world_size: int, degree: int, mode: str = "ddp") -> str:
    if world_size == 1 and mode == "ddp":
        return "1 GPU"
    gpus = f"{world_size} GPU{'s' if world_size > 1 else ''}"
    return f"{gpus} ({'DDP' if degree == 1 else f'{mode}, state sharded over {degree}'})"


def _mib(value: float) -> str:
    return f"{value / 2**20:.1f}"


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"

