"""The training run's ranks: torchrun's process group (core/ranks.py: `Ranks`, shared with evaluation), the mesh
train.parallel shards over, and whose log lines are printed. The same code runs as one plain process.

`device_mesh` is the mesh train.parallel shards over: 1-D over every rank for fsdp; 2-D for hsdp, replicas
(across nodes) x shards (within a node), so the per-micro-batch all-gathers and reduce-scatters stay on the
node's NVLink and only the once-per-step all-reduce of the sharded gradients crosses the network.
"""

import logging
import os

from core.ranks import Ranks, join
from core.ranks import leave as teardown  # noqa: F401 (re-exported: the trainer's name for it)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from err


def setup(device: str | None = None, timeout_minutes: int = 30, need_group: bool = False) -> Ranks:
    """Join the process group torchrun describes (core/ranks.py: join), or none; with `need_group`, a group of one
    without torchrun. `device`: "cuda", "cpu" or None (CUDA if present). The trainer's collectives time out after
    30 minutes (the evaluation commands keep join's hour)."""
    return join(device, timeout_minutes=timeout_minutes, need_group=need_group)


def device_mesh(env: Ranks, parallel: str, shard_size: int | None = None):
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


def quiet_other_ranks(env: Ranks, log_all_ranks: bool = False) -> None:
    """Under torchrun every rank runs the same code: INFO lines (progress, set-up) come from rank 0 only, unless
    train.log_all_ranks; warnings and errors still come from every rank, prefixed with it."""
    if env.is_main or log_all_ranks:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        handler.setFormatter(logging.Formatter(f"[rank {env.rank}] %(levelname)s %(name)s: %(message)s"))

