"""Stopping a run cleanly on SIGTERM, SIGUSR2 and SIGINT.

SLURM sends SIGTERM at the time limit and on preemption (then SIGKILL after a grace time),
submitit sends SIGUSR2 to ask a job to checkpoint and requeue, ``kill`` sends SIGTERM and Ctrl-C
SIGINT. While a run trains, these only set a flag; the loop finishes the current step, writes
``last.pt`` and then ends the run (`RunStopped`). For SIGUSR2 the handler that was installed before
the run (submitit's requeue) is called afterwards, so the job is requeued and resumes from that
checkpoint.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from stds.errors import StdsError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)


class RunStopped(StdsError):
    """The run was stopped by a signal after writing ``last.pt``; ``signum`` says which."""

    def __init__(self, message: str, signum: int, previous: Any = None) -> None:
        super().__init__(message)
        self.signum = signum
        self.previous = previous  # the handler installed before the run (submitit's requeue)

    def hand_on(self) -> None:
        """For SIGUSR2, call the handler that was there before the run (submitit checkpoints and
        requeues the job, then exits); otherwise, or without one, do nothing."""
        if self.signum == signal.SIGUSR2 and callable(self.previous):
            self.previous(self.signum, None)


class StopSignals:
    """Context manager: while inside, the stop signals set `received` instead of ending the process.

    Only the main thread can install handlers; elsewhere (a test thread, a notebook executor) this
    does nothing and the signals keep their usual effect.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def previous_handler(self, signum: int) -> Any:
        """The handler that was installed for ``signum`` before this context (None if none)."""
        return self._previous.get(signum)


def name(signum: int) -> str:
    """``SIGTERM`` for 15, and so on."""
    return signal.Signals(signum).name
