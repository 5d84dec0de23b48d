"""Checkpoints published in the background.

On a bucket, a checkpoint's upload and the index that lists it run on a thread while training
goes on.

At most one publication is in flight: the next save waits for it first, so the index is
always replaced in order, and a failed upload is raised by that save (or at the end of the
call) with the checkpoint it was for. train() returns, and a SIGTERM-ed run exits, only once the
last checkpoint is published.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

logger = logging.getLogger("torch_tpu_estimator")


class CheckpointUploadError(RuntimeError):
    """A checkpoint could not be uploaded; the checkpoints published before it are intact."""


class BackgroundPublisher:
    """Runs one publication at a time on a background thread."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._what = ""

    def submit(self, what: str, publish: Callable[[], None]) -> None:
        """Starts publish() on the thread, once the previous publication is done."""
        self.wait()
        self._what = what
        self._thread = threading.Thread(target=self._run, args=(publish,), daemon=True,
                                        name="checkpoint-upload")
        self._thread.start()

    def _run(self, publish: Callable[[], None]) -> None:
        try:
            publish()
        except BaseException as error:  # raised in the training thread by wait()
            self._error = error

    @property
    def in_flight(self) -> bool:
        """Whether a publication is running now."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Returns once nothing is in flight; raises what the last publication raised."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            if isinstance(error, CheckpointUploadError) or not isinstance(error, Exception):
                raise error
            raise CheckpointUploadError(
                f"publishing {self._what} failed ({type(error).__name__}: {error}); the "
                "checkpoints published before it are intact and the run resumes from the "
                "last of them") from error


@contextlib.contextmanager
def publishing() -> Iterator[BackgroundPublisher]:
    """A publisher whose last publication is waited for on the way out.

    On the way out of an error, a failed publication is logged rather than raised over it.
    """
    publisher = BackgroundPublisher()
    try:
        yield publisher
    except BaseException:
        try:
            publisher.wait()
        except BaseException as error:  # the first error is the one to see
            logger.error("%s", error)
        raise
    publisher.wait()
