"""The library's logger, and what each replica lets it say.

Every replica runs the same loops, so without care a job of N processes logs every line N
times. Only the chief logs progress (INFO and below); every replica logs its warnings and errors.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

logger = logging.getLogger("torch_tpu_estimator")


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
