"""SIGTERM during training: how TPU VMs and most schedulers preempt a job.

The default action kills the process at once and loses the work since the last checkpoint.
While training, the estimator notes the signal instead; the train loop ends after the step in
flight (one process) or at the end of the window (several processes, which must agree on the
step), writes a checkpoint, and `train` raises SystemExit(143), the exit status of a process
ended by SIGTERM. A restart with the same call resumes exactly there.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Any

from ..common.signals import on_sigterm

EXIT_STATUS = 128 + signal.SIGTERM


class TerminationRequest:
    """Notes SIGTERM while it is entered (in the main thread; elsewhere signals cannot be
    caught, and SIGTERM keeps its default action)."""

    def __init__(self) -> None:
        self.requested = False
        self._handling: contextlib.AbstractContextManager | None = None

    def __enter__(self) -> TerminationRequest:
        self._handling = on_sigterm(self._note)
        self._handling.__enter__()
        return self

    def _note(self) -> None:
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        self._handling.__exit__(*exc)
