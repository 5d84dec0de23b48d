"""TensorBoard event files through tensorboardX: training scalars in model_dir, eval in eval_dir."""

from __future__ import annotations

import io
import math
import os
import tempfile
import uuid

from tensorboardX import SummaryWriter, record_writer

from ..api.hooks import Hook, RunContext, Window, steps_in_window
from ..common.paths import is_url


def eval_dir(model_dir: str, name: str | None = None) -> str:
    """Where evaluation `name` writes its events: `eval` or `eval_<name>` under model_dir."""
    return os.path.join(model_dir, "eval" if not name else f"eval_{name}")


def write_error(directory: str) -> OSError | None:
    """Why event files cannot be written in `directory` (or, while it does not exist, in its
    nearest folder that does), found by creating and removing a file there; None if they can.
    Lets a call that would write its results at the end say so before it starts. (A bucket
    is not probed: its credentials are checked by its first write.)"""
    if is_url(directory):
        return None
    target = os.path.abspath(directory)
    while not os.path.isdir(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    try:
        with tempfile.TemporaryFile(dir=target):
            return None
    except OSError as error:
        return error


def open_writer(directory: str) -> SummaryWriter:
    """A writer of a new event file in `directory` (a local folder or a bucket). tensorboardX
    names event files by the second and the host only, so two writers opened in the same
    second would share (and truncate) one file: a random suffix keeps every call's events.

    tensorboardX writes to s3:// (boto3) and gs:// (google-cloud-storage) itself, uploading
    the whole event file at every flush (every FLUSH_SECONDS and at close); other fsspec
    protocols get the same behaviour through fsspec."""
    suffix = f".{uuid.uuid4().hex[:12]}"
    if not is_url(directory):
        return SummaryWriter(directory, filename_suffix=suffix)
    _register_fsspec_writer(directory.split("://", 1)[0])
    return SummaryWriter(directory, filename_suffix=suffix, flush_secs=FLUSH_SECONDS)


FLUSH_SECONDS = 30  # how stale a bucket's events may be while a call runs (tensorboardX: 120)


class _FsspecRecordWriter:
    """An event file on an fsspec store: kept in memory, uploaded whole at every flush (an
    object cannot be appended to), as tensorboardX's S3 writer does."""

    def __init__(self, path: str):
        import fsspec

        self.fs, self.path = fsspec.core.url_to_fs(path)[0], path
        self.buffer = io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.fs.pipe_file(self.path, self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _FsspecWriterFactory:
    def open(self, path: str) -> _FsspecRecordWriter:
        return _FsspecRecordWriter(path)

    def directory_check(self, path: str) -> None:
        """An object store has no folders to create."""


def _register_fsspec_writer(protocol: str) -> None:
    """Lets tensorboardX write event files over fsspec for a protocol it has no working writer
    of (its own s3 and gs writers need boto3 and google-cloud-storage)."""
    own = {"s3": record_writer.S3_ENABLED, "gs": getattr(record_writer, "GCS_ENABLED", False)}
    if not own.get(protocol, False):
        record_writer.register_writer_factory(protocol, _FsspecWriterFactory())


def write_scalars(directory: str, values: dict[str, float], step: int) -> None:
    """Writes one scalar per name at `step` into a new event file of `directory`."""
    with open_writer(directory) as writer:
        for name, value in values.items():
            writer.add_scalar(name, value, step)


class TrainSummaryHook(Hook):
    """Writes loss, learning rate, global_step/sec, examples/sec and the update step's scalars
    (Window.scalars: the gradient norm before clipping) every `every_n_steps` steps.

    The window's per-step losses are on the host, so the loss written at step s is the loss of
    step s exactly, wherever the window boundaries fall.
    """

    def __init__(self, model_dir: str, every_n_steps: int):
        self.model_dir = model_dir
        self.every_n_steps = every_n_steps
        self._writer: SummaryWriter | None = None

    def after_window(self, context: RunContext, window: Window) -> None:
        steps = steps_in_window(window, self.every_n_steps)
        if not context.is_chief or not steps:
            return
        if self._writer is None:  # opened on first use: a run that fails early writes nothing
            self._writer = open_writer(self.model_dir)
        seconds = window.seconds or float("inf")
        steps_per_sec = (window.last_step - window.first_step) / seconds
        for step in steps:
            index = step - window.first_step - 1
            self._writer.add_scalar("loss", float(window.losses[index]), step)
            rates = window.group_learning_rates[index]
            if len(set(rates.values())) == 1:  # one rate: one chart, as TF writes it
                self._writer.add_scalar("learning_rate", next(iter(rates.values())), step)
            else:  # groups that differ: one chart each, "learning_rate/<optimizer>/<group>"
                for name, rate in rates.items():
                    self._writer.add_scalar(f"learning_rate/{name}", rate, step)
            self._writer.add_scalar("global_step/sec", steps_per_sec, step)
            self._writer.add_scalar("examples/sec", window.examples / seconds, step)
            for name, values in window.scalars.items():  # the update step's (gradient_norm)
                if math.isfinite(values[index]):
                    self._writer.add_scalar(name, float(values[index]), step)

    def end(self, context: RunContext) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
