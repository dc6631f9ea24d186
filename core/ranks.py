"""Which rank this process is, under torchrun or alone, and the collectives training and evaluation share.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and MASTER_ADDR/PORT); without them `join` makes this rank 0 of 1
and no process group, unless one is asked for (FSDP2 needs a mesh even on one rank: then a group of one over an
in-memory store). The backend follows the device: NCCL on CUDA, gloo on the CPU. The trainer adds its mesh and its
logging on top (trainer/distributed.py); evaluation splits its work with `mine` and `rounds` and gathers the
results with `gather_rows`, whose rows may differ in number between ranks.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether collectives run: more than one rank, and a process group to run them in. A `Ranks(r, n)` built
        without one (a test's slice of the work) computes its share and leaves every reduction to the caller."""
        return self.world_size > 1 and dist.is_initialized()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: Tensor) -> Tensor:
        """Sum a small tensor over ranks in place, on its own device (the training step's flags and losses: no copy,
        no host sync); unchanged in a single process."""
        if self.enabled:
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def sum(self, values: Tensor) -> Tensor:
        """Sum over ranks as a float64 copy on the CPU (evaluation's counts and sums; unchanged values alone)."""
        out = values.detach().double().to(self._comm_device())
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

    def mine(self, count: int) -> range:
        """The items of `count` this rank takes: every world_size-th one, starting at its rank."""
        return range(self.rank, count, self.world_size)

    def rounds(self, count: int) -> list[int | None]:
        """`mine(count)`, then None up to ceil(count / world_size), the most any rank takes: every rank runs as
        many rounds. A sharded model's forward is a collective (FSDP2 all-gathers each block's weights), so a rank
        that ran fewer forwards than the others would leave them waiting forever; at a None a rank runs a
        stand-in forward and drops its result."""
        items: list[int | None] = list(self.mine(count))
        return items + [None] * (-(-count // self.world_size) - len(items))

    def gather_rows(self, rows: Tensor) -> Tensor:
        """Every rank's `rows` ([n_r, ...], n_r may differ), concatenated in rank order, on every rank (CPU)."""
        if not self.enabled:
            return rows.cpu()
        device = self._comm_device()
        counts = torch.zeros(self.world_size, dtype=torch.long, device=device)
        counts[self.rank] = len(rows)
        dist.all_reduce(counts)
        most = int(counts.max())
        padded = torch.zeros((most, *rows.shape[1:]), dtype=rows.dtype, device=device)
        padded[: len(rows)] = rows.to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(n)].cpu() for p, n in zip(parts, counts.tolist(), strict=True)])

    def _comm_device(self) -> torch.device:
        """NCCL moves CUDA tensors only; gloo CPU ones."""
        if self.enabled and dist.get_backend() == "nccl":
            return self.device
        return torch.device("cpu")


ALONE = Ranks()
"""One process: rank 0 of 1 on the CPU."""


def join(device: str | None = None, timeout_minutes: int = 60, need_group: bool = False) -> Ranks:
    """This process's place under torchrun, joining its process group (or rank 0 of 1 alone; with `need_group`,
    a group of one even then). `device`: cuda, cpu or None (CUDA when present); a rank takes GPU LOCAL_RANK."""
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for name, value in env.items():
        if value is not None and not value.isdigit():
            raise ValueError(f"environment variable {name}={value!r} is not a whole number (torchrun sets it)")
    rank, local, world = (int(env[k] or d) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("device=cuda, but this machine has no CUDA device")
    dev = torch.device("cuda", local) if cuda else torch.device(device or "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if (world > 1 or need_group) and not dist.is_initialized():
        # Without torchrun's MASTER_ADDR there is nobody to meet: a one-rank group over an in-memory store.
        alone = {} if "MASTER_ADDR" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes),
                                device_id=dev if cuda else None, **alone)
    return Ranks(rank, world, dev)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
