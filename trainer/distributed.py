"""Process group set-up read from torchrun's environment; the same code runs as one plain process.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT); without them this is rank 0 of 1 and
no process group is created, unless one is asked for (FSDP2 needs a mesh even on one rank: then a group of one
over an in-memory store). The backend follows the device: NCCL on CUDA, gloo on the CPU.

`device_mesh` is the mesh train.parallel shards over: 1-D over every rank for fsdp; 2-D for hsdp, replicas
(across nodes) x shards (within a node), so the per-micro-batch all-gathers and reduce-scatters stay on the
node's NVLink and only the once-per-step all-reduce of the sharded gradients crosses the network.
"""

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a small tensor over ranks (returns it unchanged in a single process)."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from err


def setup(device: str | None = None, timeout_minutes: int = 30, need_group: bool = False) -> Distributed:
    """Join the process group torchrun describes (or none; with `need_group`, a group of one without torchrun).
    `device`: "cuda", "cpu" or None (CUDA if present)."""
    rank, local_rank, world_size = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if (world_size > 1 or need_group) and not dist.is_initialized():
        # Without torchrun's MASTER_ADDR there is nobody to meet: a one-rank group over an in-memory store.
        alone = {} if "MASTER_ADDR" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=dev if use_cuda else None,
            **alone,
        )
    return Distributed(rank, local_rank, world_size, dev)


def device_mesh(env: Distributed, parallel: str, shard_size: int | None = None):
    """The DeviceMesh of train.parallel: ("shard",) over every rank for fsdp; ("replicate", "shard") for hsdp,
    with `shard_size` ranks per shard group (null: the ranks of one node, torchrun's LOCAL_WORLD_SIZE)."""
    from torch.distributed.device_mesh import init_device_mesh

    from trainer.errors import ConfigError

    world = env.world_size
    if parallel == "fsdp":
        return init_device_mesh(env.device.type, (world,), mesh_dim_names=("shard",))
    if parallel != "hsdp":
        raise ConfigError(f"train.parallel={parallel!r}: a mesh is for fsdp or hsdp")
    shards = shard_size if shard_size is not None else _env_int("LOCAL_WORLD_SIZE", world)
    if shards < 1 or world % shards:
        raise ConfigError(f"train.hsdp_shard_size={shards}: must divide the world size {world} (replicas x shards)")
    return init_device_mesh(env.device.type, (world // shards, shards), mesh_dim_names=("replicate", "shard"))


def quiet_other_ranks(env: Distributed, log_all_ranks: bool = False) -> None:
    """Under torchrun every rank runs the same code: INFO lines (progress, set-up) come from rank 0 only, unless
    train.log_all_ranks; warnings and errors still come from every rank, prefixed with it."""
    if env.is_main or log_all_ranks:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s"))


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
