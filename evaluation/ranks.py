"""Which slice of an evaluation this process does, under torchrun or alone, and how the slices meet again.

`rounds` pads a rank's slice so that every rank runs as many forwards (a sharded model needs it).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is rank 0 of 1 and no process group is made.
(trainer/distributed.py reads the same variables for training; evaluation/ may not import trainer/, and the
trainer hands its own rank and world size in through `Ranks(...)`.) A tensor is gathered to every rank with
`gather_rows`, whose rows may differ in number between ranks.
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
        return self.world_size > 1 and dist.is_initialized()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

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

    def sum(self, values: Tensor) -> Tensor:
        """Sum over ranks (a float64 copy on the collective's device; unchanged values alone)."""
        out = values.detach().double().to(self._comm_device())
        if self.enabled:
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.cpu()

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


def join(device: str | None = None, timeout_minutes: int = 60) -> Ranks:
    """This process's place under torchrun (joining its process group), or rank 0 of 1. `device`: cuda, cpu or
    None (CUDA when present); a rank takes GPU LOCAL_RANK."""
    env = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    for name, value in env.items():
        if value is not None and not value.isdigit():
            raise ValueError(f"environment variable {name}={value!r} is not a whole number (torchrun sets it)")
    rank, local, world = (int(env[k] or d) for k, d in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda, but this machine has no CUDA device")
    dev = torch.device("cuda", local) if cuda else torch.device(device or "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    return Ranks(rank, world, dev)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
