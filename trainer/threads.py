"""`train.num_threads: auto`: use the CPU cores that are actually free, and follow them as the load changes.

On a 2-core machine a second CPU-bound process makes a 2-thread torch step about thirty times slower: every
parallel region waits for the thread whose core the other process holds. One thread per free core avoids that: the
governor measures, over the time since its last look, how much CPU the rest of the machine used (all processes'
busy time from /proc/stat minus this process's own from /proc/self/stat) and sets torch's intra-op threads to the
cores left, at least one. Measured at start-up over a short window, then again at every log step (trainer/loop.py).
Linux only (elsewhere `auto` keeps torch's default). An integer fixes the count; null keeps torch's default.
Changing the count can change float summation order, so bitwise-reproducible CPU runs fix it.
"""

import logging
import os
import time

import torch

log = logging.getLogger(__name__)


def _system_busy_seconds() -> float | None:
    """Busy CPU time of the whole machine since boot, in seconds (all cores), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_busy_seconds() -> float:
    t = os.times()
    return t.user + t.system


def available_cores() -> int:
    """Cores this process may run on (the affinity mask a scheduler such as SLURM gives it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class ThreadGovernor:
    def __init__(self, setting: int | str | None, window: float = 0.3):
        self.auto = setting == "auto"
        self.cores = available_cores()
        self._last: tuple[float, float, float] | None = None
        if setting is None:
            return
        if not self.auto:
            if not (isinstance(setting, int) and setting >= 1):
                from trainer.errors import ConfigError

                raise ConfigError(f"train.num_threads={setting!r}: expected auto, null or a positive integer")
            torch.set_num_threads(setting)
            return
        self._mark()
        time.sleep(window)
        self.adjust()

    def _mark(self) -> None:
        busy = _system_busy_seconds()
        self._last = None if busy is None else (time.monotonic(), busy, _own_busy_seconds())

    def others_load(self) -> float | None:
        """Cores the rest of the machine kept busy since the last look (a fraction is possible)."""
        if self._last is None:
            return None
        then, busy_then, own_then = self._last
        busy = _system_busy_seconds()
        elapsed = time.monotonic() - then
        if busy is None or elapsed <= 0:
            return None
        return max(0.0, (busy - busy_then) - (_own_busy_seconds() - own_then)) / elapsed

    def adjust(self) -> None:
        """Re-measure and set the thread count (auto only)."""
        if not self.auto:
            return
        load = self.others_load()
        self._mark()
        if load is None:
            return
        threads = max(1, min(self.cores, round(self.cores - load)))
        if threads != torch.get_num_threads():
            log.info("num_threads=auto: %.1f of %d cores busy elsewhere, %d intra-op threads", load, self.cores,
                     threads)
            torch.set_num_threads(threads)
