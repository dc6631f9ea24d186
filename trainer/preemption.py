"""SIGTERM / SIGUSR1 (SLURM preemption or time limit) ask the run to checkpoint and exit cleanly.

The handler only sets a flag: a signal may arrive twice and at any point in a step. The loop reads the flag
once per step through an all-reduce (trainer/loop.py), so every rank stops after the same step and none is
left waiting in a collective; rank 0 then saves. scripts/slurm/README.md describes the signal's route.
"""

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager: installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            log.warning("received %s: checkpointing after this step, then exiting", signal.Signals(signum).name)
        self.received = signum

    @property
    def set(self) -> bool:
        return self.received is not None

    def __enter__(self) -> "PreemptionFlag":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
