"""SIGTERM / SIGUSR1 (SLURM preemption or time limit) and Ctrl-C ask the run to checkpoint and exit cleanly.

The handler only sets a flag: a signal may arrive twice and at any point in a step. The loop reads the flag at its
sync points (trainer/loop.py) through an all-reduce, so every rank stops after the same step and none is left
waiting in a collective; rank 0 then saves. A second Ctrl-C does not wait for the checkpoint: it interrupts at
once (KeyboardInterrupt), as a user pressing it twice expects. scripts/slurm/README.md describes the signals' route.
"""

import logging
import signal
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Context manager: installs the handlers on enter, restores the previous ones on exit."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.received is None:
            how = "press Ctrl-C again to stop without it" if signum == signal.SIGINT else "then exiting"
            log.warning("received %s: checkpointing after this step; %s", signal.Signals(signum).name, how)
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
