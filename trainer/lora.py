"""LoRA fine-tuning in the trainer (train.lora.rank > 0) [hu2022lora]: the weights of train.init_from frozen as the
base, peft's LoRA layers on the targets (core/lora.py), and only they trained, averaged, stepped and checkpointed.

The order in Trainer._build_model, and why:

1. the base weights load into the plain model (train.init_from, its ema or raw weights);
2. LoRA layers are injected: each target nn.Linear becomes peft's lora.Linear around it (the layer is then
   `<name>.base_layer`; A and B are new nn.Linear layers, B zero, so the model starts as its base exactly);
3. precision converts layers to te.Linear for FP8 (`adapter_aware`): a wrapped base layer is judged by the name it
   had, so it converts when that layer would, and the adapters' A and B never do. An FP8 run therefore has an FP8
   base with LoRA updates computed in bf16 under autocast, the split NeMo's LoRA on TE layers makes too. Injecting
   first keeps the adapter an ordinary peft layer whatever the precision (peft's own TE wrapper cannot merge);
   TE computes no weight gradient, and touches no main_grad, for a weight that does not require grad
   (transformer_engine/pytorch/module/linear.py:712, :749, :836, :954 at d0067d0; tests/te_standin.py keeps it);
4. everything but the adapters is frozen (`freeze_base`: TE's conversion makes new parameters), and on CUDA with bf16
   compute the frozen base is stored in bf16 (`store_frozen`), half the memory of fp32 masters it would never
   update; the adapters keep fp32 masters. On a CPU (no autocast) the base stays fp32;
5. the EMA (trainer/ema.py) averages the adapters only and shares the frozen base with the model; the optimizer
   takes only parameters that require grad (trainer/optim.py), so it holds moments for the adapters alone.

Checkpoints (`model`, `ema`, `optimizer`) hold the adapters only, plus te.Linear's scaling state where FP8 ran; the
metadata's `lora` record names the base (train.init_from's path, which weights, `core.lora.weights_fingerprint`
of them) and the adapter's settings. A resume rebuilds the base from train.init_from and refuses one whose weights
have another fingerprint. Beside each checkpoint rank 0 writes the run's adapters in peft's format for every tool:
out_dir/adapter (EMA weights) and out_dir/adapter_raw (core/lora.py describes the folder).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core import lora as core_lora
from core.checkpoint import is_extra_state_key
from trainer.errors import ConfigError

log = logging.getLogger(__name__)

ADAPTER_DIRS = {"ema": "adapter", "raw": "adapter_raw"}
"""Where in out_dir a LoRA run writes its adapters, by weights."""


@dataclass(frozen=True)
class LoraSettings:
    """train.lora as the trainer uses it."""

    rank: int
    alpha: float | None
    dropout: float
    target_modules: tuple[str, ...] | None

    @classmethod
    def from_config(cls, section) -> "LoraSettings":
        if section is None:
            return cls(0, None, 0.0, None)
        targets = section.get("target_modules")
        return cls(int(section.rank), None if section.get("alpha") is None else float(section.alpha),
                   float(section.get("dropout", 0.0)), None if targets is None else tuple(targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    def targets(self, model_config) -> list[str]:
        return list(self.target_modules) if self.target_modules else core_lora.default_targets(model_config)

    def peft_config(self, model_config):
        return core_lora.lora_config(self.rank, self.alpha, self.dropout, self.targets(model_config))


def require_base(settings: LoraSettings, cfg) -> None:
    """A LoRA run adapts the weights of train.init_from: it must be set (on a resume too: the base is not in the
    LoRA checkpoints)."""
    if settings.enabled and cfg.train.init_from is None:
        raise ConfigError("train.lora.rank > 0 adapts a trained model: set train.init_from to its checkpoint (or its "
                          "run folder), e.g. train.init_from=outputs/embedded/stage3")


def attach(model: nn.Module, settings: LoraSettings, model_config, base_path: Path, base_state: dict,
           which: str) -> dict[str, Any]:
    """Inject the LoRA layers into `model` (its base weights loaded) and freeze the rest; returns the metadata's
    `lora` record."""
    from core.checkpoint import WEIGHTS, split_extra_state

    base_weights = split_extra_state(base_state[WEIGHTS[which]])[0]
    try:
        core_lora.inject(model, settings.peft_config(model_config))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    freeze_base(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("LoRA rank %d (alpha %g) on %s: %s trainable parameters, %s frozen", settings.rank,
             settings.alpha or settings.rank, settings.targets(model_config), f"{trainable:,}", f"{frozen:,}")
    return dict(rank=settings.rank, alpha=float(settings.alpha or settings.rank), dropout=settings.dropout,
                target_modules=settings.targets(model_config), trainable_parameters=trainable,
                base=dict(path=str(base_path), weights=which,
                          fingerprint=core_lora.weights_fingerprint(base_weights),
                          stage=(base_state.get("metadata") or {}).get("stage"), step=base_state.get("step")))


def freeze_base(model: nn.Module) -> None:
    """Only the LoRA parameters require grad."""
    for name, p in model.named_parameters():
        p.requires_grad_(core_lora.is_adapter_parameter(name))


def store_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Keep the frozen floating-point parameters in `dtype` (the compute dtype: autocast would cast them to it at
    every use); returns how many elements changed dtype."""
    changed = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            changed += p.numel()
    return changed


def adapter_aware(include: Callable[[str, nn.Module], bool]) -> Callable[[str, nn.Module], bool]:
    """An FP8 conversion filter for a model with LoRA layers: the adapters' A and B stay high precision, and a
    wrapped base layer is judged by the name it had before the injection."""
    return lambda name, layer: not core_lora.is_adapter_parameter(name + ".") and include(logical_name(name), layer)


def logical_name(name: str) -> str:
    """A module's name as it was before LoRA wrapped it."""
    return name.removesuffix(".base_layer")


def kept(key: str) -> bool:
    """What a LoRA checkpoint keeps of a model's state: the adapters, and te.Linear's scaling state."""
    return core_lora.is_adapter_parameter(key) or is_extra_state_key(key)


def adapter_state(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if kept(k)}


def load_adapter_state(module: nn.Module, weights: dict[str, Tensor], extra: dict[str, Any], where: str) -> None:
    """A LoRA checkpoint's adapter tensors (and scaling state) into `module`; every adapter of the module must be
    there and nothing else (the base comes from train.init_from)."""
    own = {k for k in module.state_dict() if core_lora.is_adapter_parameter(k)}
    missing, unexpected = sorted(own - set(weights)), sorted(set(weights) - own)
    if missing or unexpected:
        raise ConfigError(f"{where}: its LoRA tensors do not fit this run's adapters (train.lora): missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]}")
    own_extra = {k for k in module.state_dict() if is_extra_state_key(k)}
    module.load_state_dict(dict(weights) | {k: v for k, v in extra.items() if k in own_extra}, strict=False)


def check_resumable(path: Path, meta: dict[str, Any], record: dict[str, Any] | None) -> None:
    """Refuse to resume a checkpoint whose adapter settings or base differ from this run's."""
    saved = meta.get("lora")
    if (saved is None) != (record is None):
        raise ConfigError(f"train.resume: {path} is {'a LoRA' if saved else 'a full fine-tuning'} checkpoint and this "
                          f"run {'is not' if saved else 'is'} (train.lora.rank); resume with the same train.lora")
    if record is None:
        return
    for key in ("rank", "alpha", "target_modules"):
        if saved.get(key) != record.get(key):
            raise ConfigError(f"train.resume: {path} trained a LoRA with {key}={saved.get(key)!r}, this run has "
                              f"{record.get(key)!r}: resume with the same train.lora")
    if saved["base"].get("fingerprint") != record["base"]["fingerprint"]:
        raise ConfigError(f"train.resume: {path} adapts the {saved['base'].get('weights')} weights of "
                          f"{saved['base'].get('path')}, but train.init_from={record['base']['path']} "
                          f"({record['base']['weights']}) holds other weights: resume with that base")


def adapter_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The module's LoRA tensors, whole and on the CPU. Sharded (FSDP2 DTensors) every rank must call it: each
    tensor is gathered (small: the adapters only)."""
    out = {}
    for name, p in module.named_parameters():
        if core_lora.is_adapter_parameter(name):
            full = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = full.detach().to("cpu", copy=True)
    return out


def write_adapters(out_dir: Path, settings: LoraSettings, model_config, metadata: dict[str, Any], step: int,
                   tensors: dict[str, dict[str, Tensor]]) -> None:
    """out_dir/adapter (EMA) and out_dir/adapter_raw in peft's format, each with its record."""
    record = metadata["lora"]
    for which, state in tensors.items():
        core_lora.save_adapter(
            Path(out_dir) / ADAPTER_DIRS[which], settings.peft_config(model_config), state,
            core_lora.AdapterRecord(model=metadata["model"], base=record["base"], prediction=metadata["prediction"],
                                    stage=metadata.get("stage"), step=step, weights=which,
                                    targets=list(record["target_modules"])))
