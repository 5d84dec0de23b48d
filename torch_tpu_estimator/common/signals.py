"""SIGTERM handled while a block runs, the handler before it restored after."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def on_sigterm(handler: Callable[[], None]) -> Iterator[None]:
    """Calls `handler` on SIGTERM while entered, in the main thread only: elsewhere signals
    cannot be caught, and SIGTERM keeps its action."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler())
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
