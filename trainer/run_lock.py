"""One trainer per run folder: an exclusive lock on `out_dir/.lock`, held for the whole run by rank 0.

Two trainers on one out_dir (a SLURM requeue that overlaps the job it replaces, a second launch by mistake) would
interleave checkpoints and delete each other's files. The lock is an `fcntl.flock` on the file, which the kernel
drops when the holder dies however it dies (kill -9 included), so a stale lock from a dead process is taken over
without any clean-up; the file's text names the holder (host, pid, start time) for the message the second trainer
stops with. On a shared filesystem, flock is coherent across nodes on NFSv4 and on Lustre mounted with `flock`;
on a filesystem without it the lock only guards one node.
"""

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from trainer.errors import UserError


class RunLockedError(UserError, RuntimeError):
    """Another live process holds the run folder's lock."""


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self._file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip()
            f.close()
            raise RunLockedError(
                f"{self.path.parent} is in use by another trainer ({_describe(holder)}); wait for it to finish, "
                f"stop it, or give this run another train.out_dir"
            ) from None
        f.seek(0)
        f.truncate()
        holder = dict(host=socket.gethostname(), pid=os.getpid(), started=time.strftime("%Y-%m-%d %H:%M:%S"))
        f.write(json.dumps(holder))
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    @staticmethod
    @contextmanager
    def for_run(out_dir: Path, env) -> Iterator[None]:
        """Rank 0 holds the lock for the run; every rank stops if it cannot (one all-reduce of the outcome)."""
        lock, error = RunLock(out_dir), None
        if env.is_main:
            try:
                lock.acquire()
            except RunLockedError as err:
                error = err
        failed = env.all_reduce_sum(torch.tensor([float(error is not None)], device=env.device)).item() > 0
        if failed:
            raise error or RunLockedError(f"{out_dir} is in use by another trainer (rank 0 could not lock it)")
        try:
            yield
        finally:
            lock.release()


def _describe(holder: str) -> str:
    try:
        info = json.loads(holder)
        return f"host {info['host']}, pid {info['pid']}, since {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
