"""The trainer's side of checkpoints: writing the sharded form, the global RNG states, the data position on another
world size, the optimizer's numbering in each form, and the metadata record every checkpoint carries. Reading,
listing, resolving and pruning either form is core/checkpoint.py's one surface (the sharded reader:
core/sharded_checkpoint.py), which the trainer uses as every other tool does; what a run's state is made of is
trainer/state.py.

A sharded checkpoint (train.checkpoint_format=sharded) is a folder `checkpoints/step_XXXXXXXX.dcp/`, its layout in
core/sharded_checkpoint.py. Atomic: every rank writes into `.step_XXXXXXXX.dcp.partial/`, and rank 0 renames it to
its final name once the whole checkpoint is written (DCP's save returns on rank 0 after every rank's shards are on
disk), so a folder with a final name is complete; a kill at any moment leaves the previous checkpoint as the newest.
`python -m trainer.consolidate` writes the single-file form, the same dict a DDP run saves.
"""

import logging
import os
import random
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from core.checkpoint import CheckpointMetadata, partial_path, prune, save_atomic, sharded_path
from core.files import fsync_dir
from core.sharded_checkpoint import META, rank_file

log = logging.getLogger(__name__)


# ---- the global RNG states ----------------------------------------------------------------------------------


def rng_states(device: torch.device | str | None = None) -> dict[str, Any]:
    """Global RNG states: the loop draws from its own generators, but code it calls may use these. With CUDA, the
    state of `device`'s generator (None: the current CUDA device's, when there is one), that device's only: a rank
    runs on one GPU, and its checkpoint must resume where other GPUs, or fewer, are visible (a state per visible
    device, torch.cuda.get_rng_state_all, could not be restored on fewer: set_rng_state_all indexes them)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's key array as a tensor: checkpoints load with weights_only=True, which refuses numpy objects.
    numpy_state = dict(kind=kind, keys=torch.from_numpy(keys.astype(np.int64)), pos=pos, has_gauss=has_gauss,
                       gauss=gauss)
    states = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=numpy_state)
    device = _cuda_device(device)
    if device is not None:
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, Any], device: torch.device | str | None = None) -> None:
    """`rng_states`' states back, the CUDA one into `device`'s generator (None: the current CUDA device's).
    Checkpoints written before kept one CUDA state per visible device (a list): the entry at `device`'s index is
    restored, or none when the saving run saw fewer devices (the loop's own draws never depend on it)."""
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    device, cuda = _cuda_device(device), states.get("cuda")
    if device is None or cuda is None:
        return
    if isinstance(cuda, list | tuple):
        if device.index >= len(cuda):
            log.warning("the checkpoint holds CUDA RNG states of %d devices, none for %s: its global CUDA RNG "
                        "stays as this run seeded it", len(cuda), device)
            return
        cuda = cuda[device.index]
    torch.cuda.set_rng_state(cuda, device)


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device whose RNG a run keeps, with its index; None for a CPU run."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


# ---- the data position on another world size -----------------------------------------------------------------


def continue_loader(saved: dict, world_size: int, num_workers: int, batch_size: int) -> dict:
    """The loader state (data/loader.py) that continues, on `world_size` ranks, from the global sample count of
    `saved`, a state saved on saved['world_size'] ranks: each rank starts at its share of that count. `saved`
    itself when the world size is the same (the exact resume). The order of what follows differs from the one the
    saved run would have seen (every rank's slot covers another range of the epoch's order)."""
    from data.loader import samples_per_epoch

    saved_world = int(saved.get("world_size", world_size))
    if saved_world == world_size:
        return saved
    per_saved_rank = saved.get("samples")
    if per_saved_rank is None:
        per_saved_rank = int(saved["epoch"]) * samples_per_epoch(
            int(saved["num_records"]), saved_world, int(saved.get("num_workers", 0))) + int(saved["position"])
    per_rank = int(per_saved_rank) * saved_world // world_size
    epoch, position = divmod(per_rank, samples_per_epoch(int(saved["num_records"]), world_size, num_workers))
    return dict(saved, samples=per_rank, epoch=epoch, position=position, world_size=world_size,
                num_workers=num_workers, batch_size=batch_size)


# ---- optimizer states by index and by name ------------------------------------------------------------------


def optimizer_by_name(state: dict, names: list[str]) -> dict:
    """torch.optim's state dict (parameters numbered 0.. in param_groups order) keyed by parameter name instead,
    the form torch.distributed.checkpoint.state_dict reads; `names[i]` is parameter i's name."""
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state["param_groups"]]
    return dict(state={names[i]: s for i, s in state["state"].items()}, param_groups=groups)


def optimizer_by_index(state: dict) -> dict:
    """The inverse of optimizer_by_name: the numbering torch.optim.Optimizer.state_dict() writes (parameters in
    param_groups order)."""
    order = [name for g in state["param_groups"] for name in g["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in state["param_groups"]]
    return dict(state={index[n]: state["state"][n] for n in order if n in state["state"]}, param_groups=groups)


# ---- writing sharded checkpoints ----------------------------------------------------------------------------


class ShardedWriter:
    """Writes step_N.dcp folders (module docstring), synchronously or, with `asynchronous`, through
    dcp.async_save: the call returns once the tensors are copied to host memory, the writing runs in a thread,
    and the folder is renamed to its final name when the next save starts or `wait()` is called."""

    def __init__(self, ckpt_dir: Path, env, keep: int, asynchronous: bool = False):
        import torch.distributed as dist

        self.ckpt_dir, self.env, self.keep, self.asynchronous = Path(ckpt_dir), env, keep, asynchronous
        self.pending: tuple[Future, Path, Path] | None = None
        # Its own gloo group: the writing thread's collectives must not interleave with the training step's.
        self.group = dist.new_group(backend="gloo") if asynchronous and dist.is_initialized() else None

    def save(self, step: int, tensors: dict, shared: dict, own: dict) -> Path:
        """Write one checkpoint; every rank calls it. `tensors` go through DCP, `shared` (rank 0's) to meta.pt,
        `own` (this rank's) to its rank file."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        final = sharded_path(self.ckpt_dir, step)
        tmp = partial_path(final)
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)  # a dead save's leftovers (the run lock: no live one)
        self.env.barrier()
        tmp.mkdir(parents=True, exist_ok=True)
        save_atomic(own, tmp / rank_file(self.env.rank))
        if self.env.is_main:
            save_atomic(shared, tmp / META)
        if self.asynchronous:
            self.pending = (dcp.async_save(tensors, checkpoint_id=tmp, process_group=self.group), tmp, final)
        else:
            with warnings.catch_warnings():  # DCP warns when there is no process group (one plain process)
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.save(tensors, checkpoint_id=tmp)
            self._complete(tmp, final)
        return final

    def wait(self) -> None:
        """Let the asynchronous save in flight finish, and give it its final name."""
        if self.pending is not None:
            future, tmp, final = self.pending
            self.pending = None
            future.result()
            self._complete(tmp, final)

    def _complete(self, tmp: Path, final: Path) -> None:
        if not self.env.is_main:
            return
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a rerun): the new one replaces it, never half of it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        prune(self.ckpt_dir, self.keep)


def checkpoint_writer(t: DictConfig, sharded: bool, env, ckpt_dir: Path) -> ShardedWriter | None:
    """train.checkpoint_format (null: sharded under FSDP2 / HSDP, else a file): a ShardedWriter for sharded
    checkpoints, None for one file by rank 0."""
    from trainer.errors import ConfigError

    fmt = t.checkpoint_format or ("sharded" if sharded else "file")
    if t.async_checkpoint and fmt != "sharded":  # two keys (and the mode): checked here, where all are known
        raise ConfigError("train.async_checkpoint=true writes sharded checkpoints only: set "
                          "train.checkpoint_format=sharded (or train.async_checkpoint=false)")
    return None if fmt == "file" else ShardedWriter(ckpt_dir, env, t.keep_checkpoints, t.async_checkpoint)


# ---- the metadata record ----------------------------------------------------------------------------------


def metadata_record(cfg: DictConfig, spec, mcfg, conditioning, n_params: int, converted: int,
                    lora: dict[str, Any] | None = None) -> CheckpointMetadata:
    """What every tool reads from a checkpoint to use it with no other flag (app/pipeline.py, reparameterize.py),
    built as the typed record the readers read; `lora`: a LoRA run's adapter record (trainer/lora.py)."""
    t = cfg.train
    recorded = conditioning.metadata()  # conditioning and its fields; stored text features: their record
    fields = ("conditioning", "num_classes", "class_names", "tokenizer", "text_encoder_info")
    typed = {k: recorded.pop(k) for k in fields if k in recorded}
    extra = dict(parameters=n_params, space="pixel" if spec.vae.get("id") == "identity" else "latent",
                 data=str(cfg.data.path), linear_layout="torch", trained_linear_layout="te" if converted else "torch",
                 **recorded)
    if lora is not None:  # an adapter-only checkpoint: tools load it through its base
        extra["lora"] = lora
    return CheckpointMetadata(
        model=mcfg.to_dict(), stage=cfg.stage, prediction=t.prediction,
        vae=dict(spec.vae, kind=cfg.vae.kind, name_or_path=cfg.vae.name_or_path, subfolder=cfg.vae.subfolder),
        latent_shape=list(spec.latent_shape), image_size=spec.image_size,
        text_encoder=OmegaConf.to_container(cfg.text_encoder, resolve=True) if spec.kind == "text" else None,
        sampling=dict(steps=t.preview.steps, cfg_scale=t.preview.cfg_scale, alpha=t.preview.alpha),
        extra=extra, **typed,
    )
