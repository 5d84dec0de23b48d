"""The library's logger: progress a user sees without configuring anything, and never a change
to the user's own logging configuration.

- The "torch_tpu_estimator" logger is at INFO. Until the user configures logging, it prints its
  lines to stderr itself; once the root logger has handlers (logging.basicConfig, a framework's
  setup), its lines go only through them. To quiet it, set its level:
  logging.getLogger("torch_tpu_estimator").setLevel(logging.WARNING).
- torch_xla's import calls logging.basicConfig(), which would give the root logger a handler
  and make a user's later logging.basicConfig(level=logging.INFO) do nothing. The estimator
  imports torch_xla inside keeping_root_logging(), which takes that handler back off.
- Every replica runs the same loops: only the chief logs progress (replica_logging).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

logger = logging.getLogger("torch_tpu_estimator")


class _UntilConfigured(logging.StreamHandler):
    """Prints the library's lines while the root logger has no handler of the user's."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            self.stream = sys.stderr  # as it is now (tests and notebooks replace it)
            super().emit(record)


if logger.level == logging.NOTSET:  # the user's own setting, made before the import, stays
    logger.setLevel(logging.INFO)
    logger.addHandler(_UntilConfigured())


@contextlib.contextmanager
def keeping_root_logging() -> Iterator[None]:
    """Undoes what importing modules inside it does to the root logger's handlers and level
    (torch_xla's import calls logging.basicConfig())."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


class _WarningsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def replica_logging(is_chief: bool) -> Iterator[None]:
    """While entered, a replica that is not the chief logs warnings and errors only."""
    if is_chief:
        yield
        return
    quiet = _WarningsOnly()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
