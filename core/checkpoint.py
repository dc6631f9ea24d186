"""Checkpoints, the one surface every tool reads them through: complete, atomic, read with weights_only=True, and
self-describing through a typed metadata record.

A training checkpoint (trainer/state.py: TrainingState) is a dict of tensors and plain values: `model` and `ema`
(the raw and averaged weights), `optimizer`, `scheduler`, `step`, `history`, `bad_in_row`, `extra`, `loader`, `rng`,
`config` (the resolved Hydra config) and `metadata` (`CheckpointMetadata`: what every tool needs to use the weights
with no other flag). reparameterize.py writes initialisations with the same keys for weights and metadata.

Two forms, one surface. A run's `checkpoints/` folder holds `step_XXXXXXXX.pt` files (train.checkpoint_format=file,
written by rank 0) or `step_XXXXXXXX.dcp` folders (sharded, every rank: core/sharded_checkpoint.py reads them,
trainer/checkpoint.py writes them). `list_checkpoints`, `newest`, `resolve`, `load` and `prune` take both, so
"the newest checkpoint of a run" is one function (`newest`) for the trainer, the app, the evaluation and the
scripts. `load` opens a sharded folder as the same dict, its tensors read whole when first used; a command that
writes or serves the single-file form (the app, the export, the evaluation) resolves with `single_file=True`,
which names `python -m trainer.consolidate` for a sharded checkpoint.

This module is on the inference floor (core/ imports nothing of trainer/, app/, data/ or evaluation/), so every
package can import it; what only the trainer needs (the RNG states, the sharded writer, the state of a run) is in
trainer/.

Written atomically (core/files.py): a crash at any moment leaves the previous checkpoint or the complete new one.
`prune` removes only temporaries whose writer is gone: this process's own, or a dead process's on this host.

Portable across linear layouts: Transformer Engine's te.Linear adds a `<layer>._extra_state` entry (its FP8
scaling state) to a state dict, which a plain nn.Linear model rejects. The trainer saves `model` and `ema` in the
plain layout, which every tool loads, and keeps the FP8 scaling state beside them under `te_extra_state`
({"model": {...}, "ema": {...}}) for resuming into an FP8 run; `split_extra_state` also cleans checkpoints written
the other way (older FP8 runs, `reparameterize.py to-te`).
"""

import dataclasses
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from core.files import TEMP, host, write_atomic
from core.sampling import sampling_problem

_NAME = re.compile(r"^step_(\d+)\.(pt|dcp)$")
_PARTIAL = re.compile(r"^\.step_(\d+)\.dcp\.partial$")
EXTRA_STATE = "_extra_state"
"""The suffix of the state-dict entry a module with get_extra_state (te.Linear) adds."""
WEIGHTS = {"ema": "ema", "raw": "model"}
"""`--weights` / `train.init_weights` choice -> the checkpoint key holding those weights."""


class CheckpointError(ValueError, RuntimeError):
    """A file that is not a loadable checkpoint of this repository, or not the one a command needs (a ValueError
    for callers that validate input, a RuntimeError for those that catch load failures)."""


# ---- names and folders --------------------------------------------------------------------------------------


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    """Where the single-file checkpoint of `step` goes."""
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def sharded_path(ckpt_dir: Path, step: int) -> Path:
    """Where the sharded checkpoint of `step` goes."""
    return Path(ckpt_dir) / f"step_{step:08d}.dcp"


def partial_path(final: Path) -> Path:
    """The folder a sharded checkpoint is written into before it takes its final name."""
    return final.with_name(f".{final.name}.partial")


def is_sharded(path: Path) -> bool:
    """A `step_XXXXXXXX.dcp` folder."""
    path = Path(path)
    return path.suffix == ".dcp" and path.is_dir() and _NAME.match(path.name) is not None


def step_of(path: Path) -> int | None:
    """The step a `step_XXXXXXXX.pt` file or `step_XXXXXXXX.dcp` folder records, or None for another name."""
    match = _NAME.match(Path(path).name)
    return int(match[1]) if match else None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The checkpoints of a folder, files and sharded folders, oldest step first (a file before a folder of the
    same step). A sharded folder has its final name only once complete (trainer/checkpoint.py)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _NAME.match(p.name) and (p.suffix == ".pt" or p.is_dir())]
    return sorted(found, key=lambda p: (step_of(p), p.suffix == ".dcp"))


def newest(run: Path) -> Path | None:
    """The newest checkpoint of a run: the last of `run`/checkpoints/, or of `run` itself when it is that folder;
    None when there is none. Every "latest checkpoint" in the repository is this one."""
    for folder in (Path(run) / "checkpoints", Path(run)):
        found = list_checkpoints(folder)
        if found:
            return found[-1]
    return None


def resolve(path: str | Path, what: str, single_file: bool = False) -> Path:
    """A checkpoint (a file or a sharded folder), or a run's out_dir or its checkpoints/ folder: then its `newest`.
    FileNotFoundError names `what` (the key or flag) when there is none. `single_file`: for a command that reads
    the single-file form only, a sharded checkpoint is a CheckpointError naming the consolidation command."""
    p = Path(path)
    named = f"{what} {path}" if what.startswith("-") else f"{what}={str(path)!r}"
    found = p if p.is_file() or is_sharded(p) else newest(p)
    if found is None:
        if p.is_dir():
            raise FileNotFoundError(f"{named}: a folder with no checkpoints/step_*.pt (or step_*.dcp) and no "
                                    "step_* checkpoint in it")
        raise FileNotFoundError(f"{named}: no such file or folder")
    if single_file and is_sharded(found):
        raise CheckpointError(f"{named}: {found.name} is a sharded checkpoint, and this command reads the single-file "
                              f"form (step_*.dcp: write the single-file form with `python -m trainer.consolidate "
                              f"{path} --out FILE.pt`)")
    return found


# ---- reading and writing ------------------------------------------------------------------------------------


def load(path: Path) -> dict:
    """A checkpoint without executing code; a clear CheckpointError names the file. A file is read with
    weights_only=True; a sharded folder is opened (core/sharded_checkpoint.py: its small entries read, its
    `model`, `ema` and `optimizer` read whole when first used).

    torch's own message for a refused file suggests weights_only=False, i.e. running the file's code: that
    advice is never passed on."""
    path = Path(path)
    if is_sharded(path):
        from core.sharded_checkpoint import open_sharded

        return open_sharded(path)
    if not path.is_file():
        raise CheckpointError(f"cannot load checkpoint {path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"cannot load checkpoint {path}: the file is empty (0 bytes)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated zip, another format, or a pickle that weights_only refuses
        reason = str(err).split("\n", 1)[0].strip() or type(err).__name__
        if "weights_only" in str(err) or "Weights only load failed" in str(err):
            reason = "it holds Python objects other than tensors and plain containers, which are never loaded"
        raise CheckpointError(f"cannot load checkpoint {path}: {reason}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot load checkpoint {path}: it holds a {type(state).__name__}, not a dict")
    return state


def save_atomic(obj: dict, path: Path) -> None:
    """torch.save `obj` to `path` atomically (core/files.py)."""
    write_atomic(path, lambda f: torch.save(obj, f))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """Temporary checkpoint files left by a writer that is gone: this process's own (a failed write) or a
    dead process's on this host. A live writer's, or one from another host, is never listed."""
    stale = []
    for tmp in Path(ckpt_dir).glob(".step_*.pt.tmp-*"):
        match = TEMP.match(tmp.name)
        if match is None or match["host"] != host():
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or not _pid_alive(pid):
            stale.append(tmp)
    return stale


def prune(ckpt_dir: Path, keep: int, writing: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints of either form; remove stale temporary files (stale_temporaries) and every
    partial sharded folder but `writing` (the one an asynchronous save is still filling; the run lock,
    trainer/run_lock.py, keeps other runs out of the folder)."""
    for old in list_checkpoints(ckpt_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    for stale in stale_temporaries(ckpt_dir):
        stale.unlink(missing_ok=True)
    for partial in Path(ckpt_dir).glob(".step_*.dcp.*") if Path(ckpt_dir).is_dir() else []:
        if partial != writing and (_PARTIAL.match(partial.name) or partial.name.endswith(".old")):
            shutil.rmtree(partial, ignore_errors=True)


# ---- linear layouts -----------------------------------------------------------------------------------------


def is_extra_state_key(key: str) -> bool:
    return key.endswith("." + EXTRA_STATE) or key == EXTRA_STATE


def split_extra_state(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(the weights in the plain nn.Linear layout, the `_extra_state` entries) of a model state dict."""
    weights = {k: v for k, v in state.items() if not is_extra_state_key(k)}
    extra = {k: v for k, v in state.items() if is_extra_state_key(k)}
    return weights, extra


def model_weights(ckpt: dict, which: str) -> dict[str, Tensor]:
    """The plain-layout `raw` (key `model`) or `ema` weights of a loaded checkpoint, whichever layout it was
    saved in."""
    key = WEIGHTS.get(which)
    if key is None:
        raise ValueError(f"weights must be 'ema' or 'raw', got {which!r}")
    state = ckpt.get(key)
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint holds no '{key}' weights")
    return split_extra_state(state)[0]


def load_module_state(module: torch.nn.Module, weights: dict[str, Tensor], extra: dict[str, Any] | None = None):
    """Load plain-layout `weights` (and, for te.Linear layers, their saved FP8 scaling state `extra`) into
    `module`, whichever linear layout it runs. Missing `_extra_state` entries are fine (TE starts its scaling
    afresh); any other mismatch raises load_state_dict's error."""
    own_extra = {k for k in module.state_dict() if is_extra_state_key(k)}
    state = dict(weights) | {k: v for k, v in (extra or {}).items() if k in own_extra}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not is_extra_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(f"state does not fit {type(module).__name__}: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


# ---- the metadata record ------------------------------------------------------------------------------------


DDPM_PREDICTION = "epsilon"
"""What an imported DDPM model (PixArt) records. It is refused for sampling, export and evaluation with the way to
fine-tune it: converting its output at each step would need its noise schedule mapped onto the flow's time, a sampler
of its own. Every other prediction must be one flow/objective.py turns into a velocity (PREDICTIONS)."""


@dataclass(frozen=True)
class CheckpointMetadata:
    """What a checkpoint says about itself; everything a sampler, the app, the evaluation, reparameterize.py or the
    next stage needs. The trainer builds it (trainer/checkpoint.py: metadata_record) and every reader reads it back
    (`from_dict`, checked for the tools that sample; `parse` for rebuilding a network and for the trainer). Stored as
    a plain dict (`to_dict`) so checkpoints load with weights_only=True."""

    model: dict[str, Any]
    """models/config.py:ModelConfig fields; the record's family, size and name follow from them."""
    conditioning: str | None = None
    """class or text: what the model is called with (`labels=` or `text=, text_mask=`). Initialisations written by
    hand or by older tools may lack it; `from_dict` requires it."""
    stage: int | None = None
    prediction: str = "velocity"
    """What the network outputs: velocity or x (flow/objective.py); an imported DDPM model's `epsilon`
    (app/import_weights.py), which no sampler here integrates until it is fine-tuned to velocity."""
    vae: dict[str, Any] = field(default_factory=lambda: {"id": "identity"})
    """The latent space: id, scale, shift, pixel_range (core/vae.py), plus the config's kind / name_or_path."""
    image_size: int | None = None
    """Side in pixels of the images the training latents were encoded from."""
    latent_shape: list[int] | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    """The stage's preview settings (steps, cfg_scale, alpha): the samplers' defaults."""
    num_classes: int | None = None
    class_names: list[str] | None = None
    tokenizer: dict[str, Any] | None = None
    """The shards' tokenizer identity (core/tokenizer.py)."""
    text_encoder: dict[str, Any] | None = None
    """The text_encoder config group the run used (core/text_encoder.py: FrozenTextEncoder.from_config)."""
    text_encoder_info: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Every other recorded key (parameters, space, data, linear layouts, text_features, lora, imported ...), kept as
    is."""

    IDENTITY: ClassVar[tuple[str, ...]] = ("family", "size", "name")
    """Written beside `model` at the top level, derived from it: every checkpoint so far records them there, and
    readers of the plain dict (older tools, people) look for them there. The record keeps them once, in `model`."""

    @classmethod
    def parse(cls, meta: Any, where: str) -> "CheckpointMetadata":
        """The record of a checkpoint's `metadata` as written, with its one structural need checked (a `model`
        dict; CheckpointError naming `where`): what rebuilding its network and the trainer read, initialisations
        from reparameterize.py and older files included."""
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
            raise CheckpointError(f"{where} has no metadata.model; not written by this repository")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in meta.items() if k in names},
                   extra={k: v for k, v in meta.items() if k not in names})

    @classmethod
    def from_dict(cls, meta: Any, where: str) -> "CheckpointMetadata":
        """The record of a checkpoint a tool samples, exports or evaluates: `parse`, then what it says checked
        (`check_prediction`, `check`); CheckpointError names `where` and what is missing or wrong."""
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict) or "conditioning" not in meta:
            raise CheckpointError(
                f"{where}: no metadata.model / metadata.conditioning; not a checkpoint written by this repository's "
                "trainer (reparameterize.py outputs are initialisations: train them first)"
            )
        record = cls.parse(meta, where)
        record.check_prediction(where)
        record.check(where)
        return record

    def to_dict(self) -> dict[str, Any]:
        """The plain dict a checkpoint stores: the typed fields that apply (None ones are left out), the identity
        keys (IDENTITY) and `extra`."""
        typed = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                 if f.name != "extra" and getattr(self, f.name) is not None}
        return self.extra | dict(family=self.family, size=self.size, name=self.name) | typed

    @property
    def family(self) -> str | None:
        return self.model.get("family")

    @property
    def size(self) -> str | None:
        return self.model.get("size")

    @property
    def name(self) -> str:
        """The model's display name: the one recorded (older and imported files), else ModelConfig's."""
        recorded = self.extra.get("name")
        if recorded:
            return str(recorded)
        try:
            return self.model_config.name
        except (TypeError, ValueError, KeyError):  # a record this repository does not build: its family at least
            return str(self.family or "model")

    @property
    def model_config(self):
        from models import ModelConfig

        return ModelConfig(**self.model)

    def check(self, where: str) -> None:
        """The recorded conditioning must be the one the model was built for (model.conditioning; for checkpoints
        older than that field, the family's default) and come with what it needs. `reparameterize.py
        stage1-to-stage2` writes an mmDiT that still carries Stage 1's class metadata: without this check it
        would load and fail at the first forward, far from the cause."""
        from models.config import CONDITIONINGS, default_conditioning

        if self.family not in CONDITIONINGS:
            raise CheckpointError(f"{where}: metadata.model.family is {self.family!r}, not one of "
                                  f"{', '.join(CONDITIONINGS)}")
        expected = self.model.get("conditioning") or default_conditioning(self.family)
        needs = ("num_classes",) if expected == "class" else ("text_encoder", "tokenizer")
        problems = [f"metadata.conditioning is {self.conditioning!r}"] if self.conditioning != expected else []
        problems += [f"no metadata.{key}" for key in needs if not getattr(self, key)]
        if problems:
            raise CheckpointError(
                f"{where}: a {self.family} model takes {expected} conditioning, but {', '.join(problems)}; an "
                "initialisation from reparameterize.py? Train it first (train.init_from=<that file>)"
            )
        problem = sampling_problem(self.sampling, "metadata.sampling")
        if problem:  # the samplers start from these: a bad one would reach every request that leaves it unset
            raise CheckpointError(f"{where}: {problem} (the file is damaged or was edited)")

    def check_prediction(self, where: str) -> None:
        """metadata.prediction says how the sampler reads the network's output: one of flow/objective.py's, or an
        imported DDPM model's epsilon, refused with the way to fine-tune it."""
        from flow.objective import PREDICTIONS

        if self.prediction in PREDICTIONS:
            return
        if self.prediction == DDPM_PREDICTION:
            source = (self.extra.get("imported") or {}).get("source")
            raise CheckpointError(
                f"{where}: its weights predict {self.prediction!r}" + (f" (imported from {source})" if source else "")
                + f", and this repo samples only {' or '.join(PREDICTIONS)}: fine-tune it to velocity first "
                f"(train.init_from={where.rsplit(' ', 1)[-1]} train.prediction=velocity; README, 'Fine-tune a "
                "published model')"
            )
        raise CheckpointError(f"{where}: metadata.prediction is {str(self.prediction)[:80]!r}, not one of "
                              f"{', '.join(PREDICTIONS)}: the checkpoint was altered or is damaged")

    def check_not_adapter(self, where: str) -> None:
        """CheckpointError for a LoRA run's checkpoint (metadata.lora: it holds adapters, not a model), with the
        fix."""
        lora = self.extra.get("lora")
        if isinstance(lora, dict):
            base = (lora.get("base") or {}).get("path", "its base")
            raise CheckpointError(f"{where} is a LoRA training checkpoint: it holds the adapters only. Load its base "
                                  f"with the adapter: --model-path {base} --lora <the run's out_dir>/adapter")


def read_metadata(state: dict, where: str) -> CheckpointMetadata:
    """The checked record of a loaded checkpoint (CheckpointMetadata.from_dict)."""
    return CheckpointMetadata.from_dict(state.get("metadata"), where)


# ---- rebuilding a model -------------------------------------------------------------------------------------


def model_from_state(state: dict, weights: str = "ema", where: str = "the checkpoint"):
    """The model a loaded checkpoint's metadata describes, with its `ema` or `raw` weights (plain layout, so an
    FP8-trained checkpoint loads too), in eval mode. metadata.model is checked first on the meta device: a valid
    config whose parameters have exactly the shapes of the weights the file holds, so an altered record can
    neither fail deep inside a model's constructor nor allocate more than the file's own tensors (CheckpointError
    naming `where`)."""
    from models import ModelConfig, build_model

    record = CheckpointMetadata.parse(state.get("metadata"), where)
    record.check_not_adapter(where)
    tensors = model_weights(state, weights)
    try:
        config = ModelConfig(**record.model)
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in build_model(config).state_dict().items()}
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError, OverflowError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]  # one line, whatever the constructor's checker printed
        raise CheckpointError(f"{where}: metadata.model is not a model this repository builds ({type(err).__name__}: "
                              f"{reason}); the checkpoint was altered or is damaged") from None
    held = {k: tuple(v.shape) for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if held != expected:
        missing, unexpected = sorted(expected.keys() - held.keys()), sorted(held.keys() - expected.keys())
        shaped = sorted(k for k in expected.keys() & held.keys() if expected[k] != held[k])
        raise CheckpointError(f"{where}: metadata.model ({record.name[:80]}) does not describe the {weights} weights "
                              f"it holds: {len(missing)} missing (first {missing[:2]}), "
                              f"{len(unexpected)} unexpected ({unexpected[:2]}), {len(shaped)} of another shape "
                              f"({shaped[:2]}); the checkpoint was altered or is damaged")
    model = build_model(config)
    model.load_state_dict(tensors)
    return model.eval().requires_grad_(False)


def load_model(path: Path, weights: str = "ema"):
    """Rebuild the model a checkpoint describes and load its `ema` or `raw` weights.

    Returns (model in eval mode, metadata dict). Everything needed comes from the checkpoint itself.
    """
    state = load(path)
    return model_from_state(state, weights, str(path)), state["metadata"]
