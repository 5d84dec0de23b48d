"""TensorBoard event files through tensorboardX: training scalars in model_dir, eval in eval_dir."""

from __future__ import annotations

import math
import os
import tempfile
import uuid

from tensorboardX import SummaryWriter

from ..api.hooks import Hook, RunContext, Window, steps_in_window


def eval_dir(model_dir: str, name: str | None = None) -> str:
    """Where evaluation `name` writes its events: `eval` or `eval_<name>` under model_dir."""
    return os.path.join(model_dir, "eval" if not name else f"eval_{name}")


def write_error(directory: str) -> OSError | None:
    """Why event files cannot be written in `directory` (or, while it does not exist, in its
    nearest folder that does), found by creating and removing a file there; None if they can.
    Lets a call that would write its results at the end say so before it starts."""
    target = os.path.abspath(directory)
    while not os.path.isdir(target) and os.path.dirname(target) != target:
        target = os.path.dirname(target)
    try:
        with tempfile.TemporaryFile(dir=target):
            return None
    except OSError as error:
        return error


def open_writer(directory: str) -> SummaryWriter:
    """A writer of a new event file in `directory`. tensorboardX names event files by the
    second and the host only, so two writers opened in the same second would share (and
    truncate) one file: a random suffix keeps every call's events."""
    return SummaryWriter(directory, filename_suffix=f".{uuid.uuid4().hex[:12]}")


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
