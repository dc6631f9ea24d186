"""LoRA adapters [hu2022lora] through peft: which layers each model family adapts, the adapter folder, and applying
an adapter to a model (merged into its weights, at a scale). The trainer (trainer/lora.py), the sampler, the Gradio
app and export all go through here.

An adapter is a folder in peft's own format, so `peft.PeftModel.from_pretrained(model, FOLDER)` loads it too:

    adapter_config.json         peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules, ...
    adapter_model.safetensors   the A and B matrices under the names PeftModel.save_pretrained writes
                                (base_model.model.blocks.0.attn.qkv.lora_A.weight, ...); its safetensors header holds
                                this repo's record under `rfdit` (JSON, `AdapterRecord`)

The record says what the adapter applies to: the base checkpoint (its path, which weights, and a fingerprint of
those weights), the model config, the prediction type and the run that trained it. A tool refuses an adapter whose
model config is another network's, and warns when the weights it is applied to are not the ones it was trained on
(an adapter on another fine-tune of the same network is legitimate, but rarely what was meant).

Default targets (`default_targets`): attention (self and cross: q, k, v and the output projection, which this repo's
fused qkv and kv layers hold) and the MLP in every block, the layers that decide what each token becomes and where a
new concept has to land; the embeddings, the timestep MLP and the output layer stay the base's. adaLN is added where
the condition enters the blocks only through it: ccDiT's adaLN MLPs (every block's and the final layer's) read
sinusoid(t) + the class embedding, so a LoRA that changes what a class draws needs them (a PixelDiT with a ccDiT
stream likewise). The text families leave adaLN out: mmDiT's and PixArt's adaLN-single is a function of the time
alone, shared by every block (its per-block tables are parameters, which LoRA does not adapt), and JointDiT's
modulation reads the sinusoid (plus the class embedding, whose token also enters the joint attention, which is
adapted); a caption reaches those blocks through the attention layers, which the defaults adapt.
"""

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from core.checkpoint import CheckpointError
from core.files import fsync_dir, host

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"
"""peft's name of the one adapter a model carries here; it appears in parameter names (lora_A.default.weight) but
not in the adapter file."""
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
RECORD_KEY = "rfdit"
FILE_PREFIX = "base_model.model."
"""What PeftModel puts before a module's name in an adapter file (its wrapper's attribute path to the model)."""

ATTENTION = ("attn.qkv", "attn.proj")
CROSS_ATTENTION = ("cross_attn.q", "cross_attn.kv", "cross_attn.proj")
JOINT_CONTEXT = ("attn.context_qkv", "attn.context_proj", "context_mlp.fc1", "context_mlp.fc2")
MLP = ("mlp.fc1", "mlp.fc2")
ADALN = ("adaLN.fc1", "adaLN.fc2")
"""Module-name suffixes, as peft matches a list of target_modules: a module is adapted when its name is one of them
or ends with "." + one of them (so "attn.proj" is not "cross_attn.proj")."""


def default_targets(config) -> list[str]:
    """The modules a LoRA adapts by default in the model `config` (models/config.py) describes; see the module
    docstring for why."""
    family, conditioning = config.family, config.conditioning
    if family == "ccdit" or (family == "pixeldit" and conditioning == "class"):
        return [*ATTENTION, *MLP, *ADALN]
    if family in ("mmdit", "pixart", "pixeldit"):
        return [*ATTENTION, *CROSS_ATTENTION, *MLP]
    if family in ("jointdit", "mmpixeldit"):
        return [*ATTENTION, *JOINT_CONTEXT, *MLP]
    raise ValueError(f"no default LoRA targets for model family {family!r}")


def is_adapter_parameter(name: str) -> bool:
    """A LoRA parameter's name (peft's lora_A / lora_B), in a model or in an adapter file."""
    return ".lora_A." in name or ".lora_B." in name


def lora_config(rank: int, alpha: float | None, dropout: float, targets: list[str]):
    """peft's LoraConfig: B starts at zero (peft's default init), so an adapted model starts as its base."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(rank if alpha is None else alpha), lora_dropout=float(dropout),
                      target_modules=list(targets), bias="none", init_lora_weights=True)


def matched_modules(model: nn.Module, targets: list[str]) -> dict[str, list[str]]:
    """{target: the module names it selects}, with peft's list rule (the name, or a '.'-separated suffix)."""
    names = [n for n, _ in model.named_modules()]
    return {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}


def inject(model: nn.Module, config, where: str = "train.lora.target_modules") -> nn.Module:
    """Add LoRA layers to `model` in place (peft's inject_adapter_in_model): every matched nn.Linear becomes peft's
    lora.Linear around it (the layer itself is then `<name>.base_layer`), and only the adapter parameters require
    grad. Transformer Engine layers must come after (trainer/lora.py converts the wrapped base layers), so a model
    that already holds te.Linear is refused; so is a target that selects no layer, or one that is not a linear."""
    from peft import inject_adapter_in_model

    from models.linear import te_linears

    if te_linears(model):
        raise ValueError("LoRA is injected into nn.Linear layers before any FP8 conversion; this model already has "
                         f"te.Linear layers ({len(te_linears(model))})")
    found = matched_modules(model, list(config.target_modules))
    empty = [t for t, names in found.items() if not names]
    if empty:
        raise ValueError(f"{where}: {empty} select no module of {type(model).__name__}; its linear layers are e.g. "
                         f"{_linear_kinds(model)}")
    wrong = [n for names in found.values() for n in names if type(model.get_submodule(n)) is not nn.Linear]
    if wrong:
        raise ValueError(f"{where}: {wrong[:3]} are not nn.Linear layers; LoRA adapts linear layers only")
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)


def _linear_kinds(model: nn.Module) -> str:
    from models.linear import layer_kinds

    return layer_kinds([n for n, m in model.named_modules() if type(m) is nn.Linear])


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's LoRA parameters by name (lora_A.default.weight, ...), in registration order."""
    return {n: p for n, p in model.named_parameters() if is_adapter_parameter(n)}


def to_file_names(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A model's LoRA tensors (names with peft's adapter name) under the module-relative names peft's
    set_peft_model_state_dict takes (blocks.0.attn.qkv.lora_A.weight); the file adds FILE_PREFIX."""
    marker = f".{ADAPTER_NAME}."
    return {n.replace(marker, ".", 1): v for n, v in state.items() if is_adapter_parameter(n)}


def save_lora_files(folder: Path, config, state: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """adapter_config.json and adapter_model.safetensors into an existing folder, as PeftModel.save_pretrained
    lays them out. `state`: module-relative names (to_file_names)."""
    from safetensors.torch import save_file

    config.save_pretrained(str(folder))
    save_file({FILE_PREFIX + n: v.detach().cpu().contiguous() for n, v in state.items()}, str(folder / WEIGHTS_FILE),
              metadata=metadata)


def weights_fingerprint(weights: dict[str, Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of a set of weights, in name order: the identity of the base
    an adapter was trained on, whatever file or layout held it."""
    digest = hashlib.sha256()
    for name in sorted(weights):
        tensor = weights[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


# ---- the adapter folder ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdapterRecord:
    """What an adapter file says about itself (in its safetensors header), beside peft's config."""

    model: dict[str, Any]
    """The base's models/config.py:ModelConfig fields: the network the adapter's layers belong to."""
    base: dict[str, Any]
    """The base it was trained on: path (as given to train.init_from), weights (ema | raw), fingerprint."""
    prediction: str = "velocity"
    stage: int | None = None
    step: int | None = None
    weights: str = "ema"
    """Which of the run's adapter weights this file holds: ema | raw."""
    targets: list[str] = dataclasses.field(default_factory=list)
    """train.lora.target_modules as resolved (the family's defaults when null)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), default=str)


@dataclasses.dataclass(frozen=True)
class Adapter:
    folder: Path
    config: Any
    """peft's LoraConfig."""
    state: dict[str, Tensor]
    """The A and B matrices, by module-relative name (the file's, less FILE_PREFIX)."""
    record: AdapterRecord | None
    """None for a peft adapter written elsewhere (no `rfdit` header): applied on the names alone."""


def save_adapter(folder: Path, config, state: dict[str, Tensor], record: AdapterRecord) -> Path:
    """Write an adapter folder atomically (a temporary folder renamed into place; an existing one is replaced only
    once the new one is complete). `state`: the model's LoRA tensors, with or without the adapter name."""
    folder = Path(folder)
    tensors = to_file_names(state)
    if not tensors:
        raise ValueError("no LoRA tensors to save")
    tmp = folder.with_name(f".{folder.name}.tmp-{host()}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = copy.copy(config)
        config.base_model_name_or_path = str(record.base.get("path"))  # informational: peft does not load it here
        save_lora_files(tmp, config, tensors, {"format": "pt", RECORD_KEY: record.to_json()})
        old = folder.with_name(f".{folder.name}.old-{host()}-{os.getpid()}")
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(folder.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_adapter(path: Path | str, flag: str = "--lora") -> Path:
    """An adapter folder, or a LoRA training run's folder (then its `adapter/`, the EMA adapter)."""
    path = Path(path)
    for folder in (path, path / "adapter"):
        if (folder / CONFIG_FILE).is_file():
            return folder
    if not path.exists():
        raise CheckpointError(f"{flag} {path}: no such folder")
    raise CheckpointError(f"{flag} {path}: not a LoRA adapter (no {CONFIG_FILE}; a LoRA run folder holds its "
                          "adapters in adapter/ and adapter_raw/)")


def read_adapter(path: Path | str, flag: str = "--lora") -> Adapter:
    """An adapter folder, checked: peft's config of a LoRA, a safetensors file of lora_A / lora_B pairs, the record;
    CheckpointError names the flag, the file and what is wrong. Reads JSON and safetensors only (no pickle)."""
    from peft import LoraConfig
    from safetensors import safe_open

    folder = resolve_adapter(path, flag)
    config_file, weights_file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{flag} {config_file}: not readable JSON ({err})") from err
    if not isinstance(raw, dict) or str(raw.get("peft_type", "")).upper() != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointError(f"{flag} {config_file}: peft_type is {kind!r}, not LORA")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{flag} {config_file}: not a LoRA config peft reads ({err})") from err
    if not weights_file.is_file():
        raise CheckpointError(f"{flag} {folder}: no {WEIGHTS_FILE}")
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            header = f.metadata() or {}
            state = {k.removeprefix(FILE_PREFIX): f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged header or file
        raise CheckpointError(f"{flag} {weights_file}: not a readable safetensors file ({err})") from err
    stray = [k for k in state if not is_adapter_parameter(k)]
    if stray or not state:
        raise CheckpointError(f"{flag} {weights_file}: expected lora_A / lora_B tensors only, got "
                              f"{stray[:3] or 'none'}")
    return Adapter(folder, config, state, _record(header, weights_file, flag))


def _record(header: dict[str, str], where: Path, flag: str) -> AdapterRecord | None:
    if RECORD_KEY not in header:
        return None
    try:
        fields = json.loads(header[RECORD_KEY])
        return AdapterRecord(**{f.name: fields[f.name] for f in dataclasses.fields(AdapterRecord) if f.name in fields})
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise CheckpointError(f"{flag} {where}: its `{RECORD_KEY}` record is unreadable ({err})") from err


# ---- applying an adapter --------------------------------------------------------------------------------------


ARCHITECTURE_FIELDS = ("family", "conditioning", "dim", "depth", "heads", "patch", "in_channels", "mlp_ratio",
                       "cond_dim", "num_classes", "text_dim", "text_len", "num_registers", "pixel_dim", "pixel_depth",
                       "qk_norm", "activation", "caption_projection")
"""The ModelConfig fields that decide which layers exist and their shapes."""


def check_fits(adapter: Adapter, model: nn.Module, base_weights: dict[str, Tensor] | None, flag: str) -> None:
    """CheckpointError when the adapter was trained for another network; a warning when `base_weights` are not the
    ones it was trained on (fingerprints differ)."""
    record = adapter.record
    if record is None:
        log.warning("%s %s: a peft adapter without this repository's record: applied by its layer names alone",
                    flag, adapter.folder)
        return
    ours = model.config.to_dict()
    differ = [f"{k} {record.model.get(k)!r} (adapter) != {ours.get(k)!r}" for k in ARCHITECTURE_FIELDS
              if k in record.model and record.model.get(k) != ours.get(k)]
    if differ:
        raise CheckpointError(f"{flag} {adapter.folder}: trained for another network than this checkpoint's: "
                              + "; ".join(differ))
    expected = record.base.get("fingerprint")
    if base_weights is not None and expected and weights_fingerprint(base_weights) != expected:
        log.warning("%s %s was trained on other weights (%s, %s weights) than the ones it is applied to: the same "
                    "network, so it applies, but the result is not what its training saw", flag, adapter.folder,
                    record.base.get("path"), record.base.get("weights"))


def apply_adapter(model: nn.Module, adapter: Adapter, scale: float = 1.0, merge: bool = True,
                  flag: str = "--lora") -> nn.Module:
    """`model` with the adapter's layers added and loaded, its update scaled by `scale` (peft's set_scale: the
    update is scale x alpha / r x B A). With `merge`, the update is added into the base weights and the LoRA
    layers removed again (peft's merge_and_unload), so the result has the base's own names and runs at the base's
    speed. The same module object is returned."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer, LoraModel

    tuner = LoraModel(model, adapter.config, ADAPTER_NAME)
    loaded = set_peft_model_state_dict(tuner.model, adapter.state, adapter_name=ADAPTER_NAME)
    missing = [k for k in loaded.missing_keys if is_adapter_parameter(k)]
    if loaded.unexpected_keys or missing:
        raise CheckpointError(f"{flag} {adapter.folder}: its tensors do not fit the layers its config names: "
                              f"unexpected {list(loaded.unexpected_keys)[:3]}, missing {missing[:3]}")
    for module in tuner.model.modules():
        if isinstance(module, LoraLayer):
            module.set_scale(ADAPTER_NAME, float(scale))
    if merge:
        return tuner.merge_and_unload(safe_merge=True)
    return tuner.model
