"""The typed schema of every training config key, registered with Hydra's ConfigStore as `schema`.

configs/base.yaml starts from it (`defaults: - schema`), so every YAML file and every command-line override is
checked against these types by OmegaConf: `train.batch_size=abc` stops with the key's name before anything runs,
and a misspelt key is refused. The docstring under each field is its documentation, and its only one: the YAML
files under configs/ say what a stage or an option changes, and why. `python train_stageN.py --help` prints it next
to the stage's value (trainer/cli.py). Ranges that a type cannot say (a positive learning rate, a probability) are
written once, in RANGES, and checked by `check_ranges` when a run starts.

Fields typed `Any` take more than one kind of value (say `train.compile`: false, true or "block"); the code that
reads them validates them with a message naming the key.
"""

import ast
import math
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from trainer.errors import ConfigError


@dataclass
class ModelSection:
    family: str = "mmdit"
    """ccdit | mmdit | jointdit | pixeldit | mmpixeldit | pixart (models/; `python -m models` lists every named model;
    pixart is diffusers' PixArt-alpha transformer, configs/model/pixart.yaml)."""
    size: str = "XL"
    """S | B | L | XL | debug: DiT's widths and depths (models/registry.py)."""
    patch: int = 2
    """Patch side in latent pixels (2 or 4; pixel families 8 or 16)."""
    conditioning: str | None = None
    """class | text; null: the family's default (models/config.py CONDITIONINGS)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Any field of models/config.py:ModelConfig. in_channels, input_size, num_classes, text_dim and text_len come
    from the data and the text encoder unless set here (then they must agree)."""


@dataclass
class DataSection:
    path: str = MISSING
    """Shard folder with manifest.json (data/README.md), e.g. /scratch/me/shards/imagenet1k-256."""
    image_size: int | None = None
    """Pixels of the images the shards hold: python -m planner sizes the run from it before the data exists
    (the manifest rules once it does)."""
    num_workers: int = 4
    """DataLoader workers per rank (0: in the training process)."""
    mix_shards: int = 4
    """Shards whose records are shuffled together (a batch mixes about this many)."""
    short_caption_prob: float = 0.0
    """Text data with short captions: probability of the short caption instead of the long one."""
    verify_checksum: bool = True
    """sha256 of every shard when a process first opens it."""
    skip_bad_shards: bool = False
    """true: warn and skip a corrupt shard instead of stopping."""
    text_features: bool | None = None
    """Text data: null uses the encoder states stored in the shards when they hold them (data/make_shards.py
    --text-features; the encoder is then not loaded for training, and must be the one that made them); false encodes
    the tokens with text_encoder on every step; true requires stored states."""
    buckets: list[str] | None = None
    """Aspect-ratio bucketed data (data/buckets.py; data/make_shards.py --buckets writes it): train on these buckets
    only, 'HxW' in pixels, height first, e.g. [1024x1024]; null: every bucket of the shards, each batch of one
    bucket, buckets drawn in proportion to their records."""


@dataclass
class TimestepsSection:
    name: str = "logit_normal"
    """How training times are drawn (flow/objective.py), by the SD3 scripts' names [esser2024sd3]: logit_normal
    (t = sigmoid(N(mean, std)), the default: most draws at mid times) | uniform | mode (mode_scale > 0 favours mid
    times, < 0 the ends) | cosmap (the density of a cosine schedule's log-SNR)."""
    mean: float = 0.0
    """logit_normal: mean of the normal whose sigmoid is t; > 0 moves draws toward data (t = 1), as diffusers'
    logit_mean."""
    std: float = 1.0
    """logit_normal: its standard deviation."""
    mode_scale: float = 1.29
    """mode: SD3's scale s, in [-1, 2 / (pi - 2) = 1.75]; 0 is uniform; 1.29 is diffusers' default."""
    shift: Any = None
    """SD3 resolution shift: null or 1 none; a number; auto = sqrt(tokens / base_grid^2) for each batch's grid."""
    weighting: str = "none"
    """Loss weight by time (flow/objective.py loss_weight), as diffusers' SD3 scripts name them: none | sigma_sqrt
    (sigma^-2, sigma = 1 - t: weights the data end) | cosmap (CosMap's density as a weight on the draws)."""


@dataclass
class EMASection:
    decay: float = 0.99
    """Final decay of the exponential moving average of the weights (trainer/ema.py)."""
    every: int = 100
    """Steps between EMA updates."""
    warmup_steps: int = 3000
    """Steps over which the decay rises linearly from start_decay to decay (0: no ramp)."""
    start_decay: float = 0.01
    """Decay at step 0 of the ramp."""


@dataclass
class PreviewSection:
    labels: list[int] = field(default_factory=lambda: [2, 316, 418, 551, 804, 981, 984, 1000])
    """Class stages: the classes previewed (the reference's ImageNet picks; the last is the null class)."""
    prompts: list[str] = field(default_factory=lambda: [
        "a photograph of a red fox sitting in fresh snow, soft morning light",
        "a bowl of ramen with a soft-boiled egg on a wooden table",
        "a lighthouse on a rocky coast at sunset",
        "an astronaut riding a horse on the moon, digital art",
    ])
    """Text stages: the prompts previewed, one column each."""
    rows: int = 1
    """Rows of the preview grid: one noise seed each."""
    seed: int = 0
    """Seed of the previews' fixed noise."""
    steps: int = 24
    """ODE steps of a preview (and the default of the samplers for this checkpoint)."""
    cfg_scale: float = 4.0
    """Classifier-free guidance scale of the previews (and the samplers' default)."""
    alpha: float = 1.0
    """Time-grid warp of the previews (> 1: more steps near noise; the samplers' default)."""
    scale: int = 1
    """Nearest-neighbour upscaling of the saved PNG."""


@dataclass
class EvalSection:
    every: int = 0
    """Steps between on-cadence evaluations (and one at the last step); 0: off. Every rank takes part; the time it
    takes is logged (val/seconds) and kept out of train/img_per_s."""
    data: str | None = None
    """Held-out shard folder of the validation loss (same latent space and conditioning as data.path); null: the
    training folder itself, which is then not held out (a warning says so)."""
    samples: int = 1024
    """Held-out records (the folder's first, unshuffled; all of them if it holds fewer)."""
    batch_size: int = 32
    """Records per validation batch; with train.seed it fixes the noise, so keep it to compare runs."""
    bins: int = 8
    """Fixed times of the validation loss: the centres of this many equal bins of [0, 1] (SD3's; no shift)."""
    weights: str = "ema"
    """ema | raw | both: which weights are evaluated (val/ for the EMA, val_raw/ for the raw weights)."""
    fid_samples: int = 0
    """> 0: also a FID of the EMA weights from this many samples (e.g. 5000), drawn on every rank with the preview
    settings (evaluation/sample_fid.py); 0: off."""
    fid_reference: str | None = None
    """The FID's reference: an ADM .npz, one saved by python -m evaluation.metrics --save-reference, or a folder of
    images (required with fid_samples)."""
    fid_features: str = "inception"
    """inception (the FID Inception; pip install -e '.[eval]') | scene (the embedded scenes' own encoder)."""
    fid_captions: str | None = None
    """Text stages: a caption file (one per line) to condition the FID's samples on; null: the captions of
    train.eval.data's shards (or data.path's)."""
    inception_weights: str | None = None
    """The FID Inception's weights file; null: torch's hub cache (downloaded on first use)."""


@dataclass
class LoraSection:
    rank: int = 0
    """LoRA rank r [hu2022lora]; 0: off (full fine-tuning). > 0: the weights of train.init_from are frozen and only
    peft's LoRA layers on target_modules are trained, averaged and checkpointed (trainer/lora.py); the run writes
    its adapters to out_dir/adapter (EMA) and out_dir/adapter_raw, for app/sample.py --lora."""
    alpha: float | None = None
    """LoRA's alpha: the update is alpha / rank x B A; null: alpha = rank (scale 1)."""
    dropout: float = 0.0
    """Dropout on the adapters' input (peft's lora_dropout), in training only."""
    target_modules: list[str] | None = None
    """Module-name suffixes to adapt (peft's list rule: 'attn.qkv' adapts every blocks.N.attn.qkv); null: the
    family's default, attention and MLP in every block, plus adaLN where the class enters through it (ccdit;
    core/lora.py: default_targets says why)."""


@dataclass
class TrainSection:
    max_steps: int = 300_000
    """Optimiser steps of the stage."""
    max_minutes: float | None = None
    """Also stop (checkpoint, previews, held losses) after this much wall-clock time."""
    batch_size: int = 1024
    """Global batch; each rank's micro-batch is batch_size / (world_size x grad_accum)."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (DDP syncs gradients on the last one only)."""
    out_dir: str = "${runs_dir}/stage${stage}"
    """checkpoints/, samples/, metrics.jsonl, loss.png, summary.json and the resolved config."""
    resume: str = "auto"
    """auto: the newest checkpoint in out_dir if any; never: start fresh; or a checkpoint path. A resume keeps the
    weights, EMA, optimizer moments, history, data position and RNG, and takes the schedule from this config."""
    init_from: str | None = None
    """Start from these weights: a checkpoint file, or a run's out_dir (its newest checkpoint); null: fresh."""
    init_weights: str = "ema"
    """Which weights of init_from: ema | raw."""
    ckpt_every: int = 1000
    """Steps between checkpoints."""
    keep_checkpoints: int = 5
    """Newest K checkpoints kept."""
    log_every: int = 10
    """Steps between log lines (metrics.jsonl, wandb, and the progress line without a terminal)."""
    sync_every: int = 10
    """Steps between the loop's reads from the device (losses, stop flags); log, preview and checkpoint steps always
    read. A signal or the time limit is acted on at the next read."""
    log_all_ranks: bool = False
    """Under torchrun, INFO lines from every rank (default: rank 0; warnings always from all)."""
    sample_every: int = 5000
    """Steps between preview grids (EMA and raw weights)."""
    eval_batches: int = 4
    """Fixed held batches whose loss is measured at a stage's start and end (0: off)."""
    label_dropout: float = 0.1
    """Class stages: per-sample probability of the null class (classifier-free guidance)."""
    caption_dropout: float = 0.1
    """Text stages: per-sample probability of the empty caption (all-False mask)."""
    prediction: str = "velocity"
    """velocity | x (the network outputs the clean image x1; JiT)."""
    num_threads: Any = None
    """Torch CPU threads: null (torch's default), an integer, or auto (the cores other processes leave free,
    followed as the load changes: trainer/threads.py)."""
    compile: Any = False
    """false | true (torch.compile the whole forward) | block (each block, in place). The unwrapped model is saved.
    With precision.fp8 it cannot trace te.Linear (TE marks its forward no_torch_dynamo): each block's graph is cut at
    every te.Linear, and with activation_checkpointing the blocks (checkpointed by TE) run eagerly (README)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (memory for about 1/3 more compute). Blocks with te.Linear
    layers recompute through TE's checkpoint, inside the FP8 autocast (trainer/fast_path.py)."""
    parallel: str = "ddp"
    """ddp | fsdp | hsdp (trainer/parallel.py). ddp: every rank holds the whole model, gradients, AdamW and EMA.
    fsdp: FSDP2 shards them over all ranks (per block, then the root; bf16 compute parameters and fp32 reduction
    on GPU). hsdp: shards within a group of train.hsdp_shard_size ranks and replicates across groups."""
    hsdp_shard_size: int | None = None
    """hsdp: ranks per shard group (a 2-D mesh: replicas x shards); null: the ranks of one node (torchrun's
    LOCAL_WORLD_SIZE). Must divide the world size."""
    checkpoint_format: str | None = None
    """file (one step_N.pt written by rank 0) | sharded (a step_N.dcp folder written by every rank through
    torch.distributed.checkpoint; resumable on another world size or train.parallel); null: file for ddp, sharded
    for fsdp and hsdp. `python -m trainer.consolidate` turns a sharded one into a file."""
    async_checkpoint: bool = False
    """sharded: write checkpoints in a background thread (dcp.async_save): the loop waits only for the copy to
    host memory, and the previous save finishes before the next starts."""
    memory_check: bool = True
    """On CUDA, plan the memory first (python -m planner) and stop if the run cannot fit."""
    max_bad_steps: int = 10
    """Consecutive steps with a non-finite gradient before the run stops."""
    text_cache: int = 0
    """Text stages: keep the frozen encoder's output for up to this many distinct captions (on the host: for CPU
    runs with repeating captions; on CUDA it reads encoded rows back each step)."""
    timesteps: TimestepsSection = field(default_factory=TimestepsSection)
    ema: EMASection = field(default_factory=EMASection)
    preview: PreviewSection = field(default_factory=PreviewSection)
    eval: EvalSection = field(default_factory=EvalSection)
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class OptimSection:
    lr: float = 1.0e-4
    """AdamW learning rate (after warmup)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    eps: float = 1.0e-15
    """AdamW epsilon (the reference's)."""
    weight_decay: float = 0.03
    """Decoupled weight decay, on matrices only (none on biases, norms, embeddings)."""
    warmup_steps: int = 2000
    """Linear warmup from 0."""
    decay_fraction: float = 0.0
    """> 0: linear decay to 0 over this last fraction of train.max_steps."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (after the gradients are reduced, DDP or FSDP, so equal on every rank)."""
    fused: bool | None = None
    """The fused AdamW kernel (null: on when training on CUDA); it also skips a non-finite step on the device."""


@dataclass
class VAESection:
    kind: str = "sd3"
    """sd3 (diffusers' AutoencoderKL) | identity (pixel space); must be what encoded the shards."""
    name_or_path: str | None = None
    """Hub id or local folder of the VAE (previews decode with it)."""
    subfolder: str | None = None
    """A folder inside name_or_path holding the VAE (vae/ in a pipeline checkout)."""


@dataclass
class TextEncoderSection:
    name_or_path: str | None = None
    """Hub id or local folder of the frozen encoder; null: the bundled MiniLM (core/text_encoder.py)."""
    subfolder: str | None = None
    """A folder inside name_or_path holding config.json (e.g. text_encoder/)."""
    hidden_size: int = 2048
    """Width of the last hidden state; checked against the loaded model; the DiT's text_dim."""
    max_length: int = 120
    """Tokens per caption, as the shards were tokenized (checked against their manifest)."""
    dtype: str = "bfloat16"
    """On GPU; a CPU run uses float32."""
    tokenizer: str | None = None
    """Hub id or folder of its tokenizer (null: name_or_path's); checked against the shards' recorded tokenizer."""
    trust_remote_code: bool = False
    """Run code shipped with the encoder: only for an encoder you trust, never from a checkpoint."""


@dataclass
class PrecisionSection:
    compute: str = "bf16"
    """bf16 | fp32. bf16 autocast runs on CUDA; on a CPU the run stays fp32 and says so, unless bf16_on_cpu."""
    bf16_on_cpu: bool = False
    """compute=bf16 on a CPU: autocast there too (bf16 compute, fp32 master weights and loss) instead of fp32. Off
    by default (bf16 speed on a CPU depends on its bf16 instructions); the tests use it to run the bf16 path."""
    fp8: bool = False
    """Transformer Engine te.Linear for the large projections (models/linear.py; needs TE and an FP8 GPU: without
    them the layers stay nn.Linear and one log line says why)."""
    fp8_recipe: str = "auto"
    """auto | mxfp8 | current | delayed (auto: MXFP8 on Blackwell sm_100+, current scaling on Hopper). Layers convert
    where rows and features are multiples of 16 (mxfp8: 32) in every bucket; delayed's amax history is dropped on
    resume unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1 (trainer/precision.py)."""
    keep_high_precision: list[str] | None = None
    """fp8: linear layers whose name contains any of these stay bf16 (null: models/linear.py's list; []: every
    linear whose sizes FP8 can take)."""
    fuse_wgrad_accumulation: bool = False
    """fp8, train.parallel=ddp: te.Linear accumulates weight gradients into an fp32 weight.main_grad inside its
    wgrad GEMM; those weights have no .grad, so trainer/main_grad.py keeps them out of DDP and all-reduces
    main_grad itself."""


@dataclass
class WandbSection:
    mode: str = "auto"
    """auto (online with an API key, else offline) | online | offline | disabled."""
    project: str = "rfdit"
    """The wandb project the runs log to."""
    entity: str | None = None
    """Your team, or null for your default entity."""
    name: str | None = None
    """null: stage<N>-<out_dir name>."""
    tags: list[str] = field(default_factory=list)
    """Tags of the wandb run."""


@dataclass
class RunConfig:
    stage: int = MISSING
    """Curriculum stage 1..5 (configs/stageN.yaml)."""
    starts_from: int | None = None
    """The stage whose weights this one starts from (through train.init_from); null: none (Stage 1)."""
    seed: int = 0
    """Seeds the model init and, with the step and rank, every draw of noise, time and dropout."""
    device: str | None = None
    """cuda | cpu | null (CUDA when available); under torchrun each rank takes its LOCAL_RANK GPU."""
    runs_dir: str = "outputs"
    """Where the stages' run folders live: stage N writes runs_dir/stageN and starts from runs_dir/stage(N-1)."""
    embedded_data: str | None = None
    """experiment=embedded: where scripts/tools/build_embedded_data.sh wrote the embedded shards."""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    optim: OptimSection = field(default_factory=OptimSection)
    vae: VAESection = field(default_factory=VAESection)
    text_encoder: TextEncoderSection = field(default_factory=TextEncoderSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    wandb: WandbSection = field(default_factory=WandbSection)


ConfigStore.instance().store(name="schema", node=RunConfig)


# ---- keys ---------------------------------------------------------------------------------------------------


def check_keys(cfg: DictConfig, schema: type = RunConfig, prefix: str = "") -> None:
    """ConfigError naming the first key the schema does not have, with the closest known key. OmegaConf refuses
    a misspelt key on its own, but Hydra's `+key=value` adds one to the composed config, where nothing would
    read it: `+train.bach_size=64` would train with the default batch. model.overrides, a free-form dictionary,
    takes the fields of models/config.py:ModelConfig."""
    from models.config import ModelConfig

    known = {f.name: f for f in fields(schema)}
    for key in cfg:
        if key not in known:
            raise ConfigError(_unknown(f"{prefix}{key}", known, prefix, "`train_stageN.py --help` lists every key"))
        kind = known[key].default_factory() if callable(known[key].default_factory) else None  # type: ignore[misc]
        if is_dataclass(kind) and isinstance(cfg[key], DictConfig):
            check_keys(cfg[key], type(kind), f"{prefix}{key}.")
    if schema is ModelSection and isinstance(cfg.overrides, DictConfig):
        model_fields = {f.name: f for f in fields(ModelConfig)}
        for key in cfg.overrides:
            if key not in model_fields:
                raise ConfigError(_unknown(f"{prefix}overrides.{key}", model_fields, f"{prefix}overrides.",
                                           "models/config.py:ModelConfig has the fields it takes"))


def _unknown(key: str, known, prefix: str, where: str) -> str:
    import difflib

    close = difflib.get_close_matches(key.removeprefix(prefix), list(known), n=1)
    return f"{key}: not a key of the config{f'; did you mean {prefix}{close[0]}?' if close else ''} ({where})"


# ---- ranges -------------------------------------------------------------------------------------------------

def _sampling_default(key: str, v) -> bool:
    """Within core/checkpoint.py's SAMPLING_CAPS: the preview settings become the checkpoint's sampling defaults,
    which every sampler refuses outside them."""
    from core.sampling import SAMPLING_CAPS

    lo, hi = SAMPLING_CAPS[key]
    return lo <= v <= hi


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


RANGES: dict[str, tuple[Any, str]] = {
    "stage": (lambda v: 1 <= v <= 5, "1..5"),
    "train.max_steps": (lambda v: v >= 1, ">= 1"),
    "train.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.grad_accum": (lambda v: v >= 1, ">= 1"),
    "train.ckpt_every": (lambda v: v >= 1, ">= 1"),
    "train.log_every": (lambda v: v >= 1, ">= 1"),
    "train.sync_every": (lambda v: v >= 1, ">= 1"),
    "train.sample_every": (lambda v: v >= 1, ">= 1"),
    "train.keep_checkpoints": (lambda v: v >= 1, ">= 1"),
    "train.eval_batches": (lambda v: v >= 0, ">= 0"),
    "train.max_bad_steps": (lambda v: v >= 1, ">= 1"),
    "train.text_cache": (lambda v: v >= 0, ">= 0"),
    "train.eval.every": (lambda v: v >= 0, ">= 0 (0: off)"),
    "train.eval.samples": (lambda v: v >= 1, ">= 1"),
    "train.eval.batch_size": (lambda v: v >= 1, ">= 1"),
    "train.eval.bins": (lambda v: 1 <= v <= 1000, "1..1000"),
    "train.eval.weights": (lambda v: v in ("ema", "raw", "both"), "ema, raw or both"),
    "train.eval.fid_samples": (lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
    "train.eval.fid_features": (lambda v: v in ("inception", "scene"), "inception or scene"),
    "train.lora.rank": (lambda v: v >= 0, ">= 0 (0: off)"),
    "train.lora.alpha": (lambda v: v is None or (_finite(v) and v > 0), "null or a finite number > 0"),
    "train.lora.dropout": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "train.lora.target_modules": (lambda v: v is None or (len(v) > 0 and all(isinstance(x, str) and x for x in v)),
                                  "null or a non-empty list of module names"),
    "train.max_minutes": (lambda v: v is None or (_finite(v) and v > 0), "null or > 0"),
    "train.label_dropout": (lambda v: _finite(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "train.caption_dropout": (lambda v: _finite(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "train.prediction": (lambda v: v in ("velocity", "x"), "velocity or x"),
    "train.init_weights": (lambda v: v in ("ema", "raw"), "ema or raw"),
    "train.ema.decay": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "train.ema.start_decay": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "train.ema.every": (lambda v: v >= 1, ">= 1"),
    "train.ema.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "train.preview.steps": (lambda v: _sampling_default("steps", v), "1..1000 (the samplers' caps)"),
    "train.preview.rows": (lambda v: v >= 1, ">= 1"),
    "train.preview.cfg_scale": (lambda v: _sampling_default("cfg_scale", v), "0..100 (the samplers' caps)"),
    "train.preview.alpha": (lambda v: _sampling_default("alpha", v), "0.01..100 (the samplers' caps)"),
    "train.timesteps.std": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "train.timesteps.mean": (_finite, "a finite number"),
    "train.timesteps.name": (lambda v: v in ("logit_normal", "uniform", "mode", "cosmap"),
                             "logit_normal, uniform, mode or cosmap"),
    "train.timesteps.mode_scale": (lambda v: _finite(v) and -1 <= v <= 2 / (math.pi - 2),
                                   "a number in [-1, 2 / (pi - 2) = 1.7519] (f_mode monotone)"),
    "train.timesteps.weighting": (lambda v: v in ("none", "sigma_sqrt", "cosmap"), "none, sigma_sqrt or cosmap"),
    "optim.lr": (lambda v: _finite(v) and 0 < v <= 1, "a finite number in (0, 1]"),
    "optim.eps": (lambda v: _finite(v) and 0 < v < 1, "in (0, 1)"),
    "optim.weight_decay": (lambda v: _finite(v) and 0 <= v < 1, "in [0, 1)"),
    "optim.warmup_steps": (lambda v: v >= 0, ">= 0"),
    "optim.decay_fraction": (lambda v: _finite(v) and 0 <= v <= 1, "in [0, 1]"),
    "optim.grad_clip": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "optim.betas": (lambda v: len(v) == 2 and all(_finite(b) and 0 <= b < 1 for b in v), "two numbers in [0, 1)"),
    "data.short_caption_prob": (lambda v: _finite(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    "data.num_workers": (lambda v: v >= 0, ">= 0"),
    "data.mix_shards": (lambda v: v >= 1, ">= 1"),
    "precision.compute": (lambda v: v in ("bf16", "fp32"), "bf16 or fp32"),
    "precision.fp8_recipe": (lambda v: v in ("auto", "mxfp8", "current", "delayed"), "auto, mxfp8, current or delayed"),
    "train.parallel": (lambda v: v in ("ddp", "fsdp", "hsdp"), "ddp, fsdp or hsdp"),
    "train.hsdp_shard_size": (lambda v: v is None or v >= 1, "null or >= 1"),
    "train.checkpoint_format": (lambda v: v in (None, "file", "sharded"), "null, file or sharded"),
}
"""What each key must be, beyond its type: the one statement of each rule. `check_ranges` applies them all when a
run (or a plan) starts, so a bad value stops it with one line naming the key before anything is built; the classes
that take one of these values on its own, and that tests and scripts build without a run config (Precision,
Parallel, the FP8 recipe), apply the same rule through `check_value`. A rule that needs another value (a divisor
of the world size, async checkpoints only when sharded) stays where both are known. The layers below the trainer
(flow/, data/, evaluation/) check their own arguments, as libraries must: they also take these values from a
checkpoint's record or from their own command lines, and do not import the trainer."""


def check_value(key: str, value: Any) -> None:
    """ConfigError naming `key` when `value` breaks its rule in RANGES."""
    ok, requirement = RANGES[key]
    try:
        good = bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key}={value!r}: expected {requirement}")


def check_ranges(cfg: DictConfig) -> None:
    """ConfigError naming the first key whose value breaks its rule (RANGES)."""
    for key in RANGES:
        value = cfg
        for part in key.split("."):
            value = value[part]
        check_value(key, value)


# ---- documentation ------------------------------------------------------------------------------------------


def field_docs(schema: type = RunConfig, prefix: str = "") -> dict[str, str]:
    """{dotted key: its docstring} for every leaf field of the schema, read from this file's source (the string
    right after a field is its documentation, as for ModelConfig)."""
    source = ast.parse(Path(__file__).read_text())
    classes = {node.name: node for node in source.body if isinstance(node, ast.ClassDef)}
    docs: dict[str, str] = {}
    body = classes[schema.__name__].body
    own = {}
    for node, after in zip(body, body[1:] + [None], strict=True):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            own[node.target.id] = " ".join(str(after.value.value).split())
    for f in fields(schema):
        kind = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(kind):
            docs |= field_docs(type(kind), f"{prefix}{f.name}.")
        else:
            docs[f"{prefix}{f.name}"] = own.get(f.name, "")
    return docs
