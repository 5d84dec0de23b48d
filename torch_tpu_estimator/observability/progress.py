"""Progress of a long call: a tqdm bar on a terminal, a log line every few seconds elsewhere.

Steps done of the total (train), examples read of the total (evaluate, predict; when the input
is a Dataset, whose length is known), the rate, the time left and the last loss. It is a hook:
it is updated at window ends only, from what the window already brought to the host, so it
never reads the device. `RunConfig(progress=...)`: "auto" (a bar when stderr is a terminal,
else log lines), "bar", "log" or "off".
"""

from __future__ import annotations

import logging
import sys
import time

from ..api.hooks import Hook, RunContext, Window
from ..api.spec import ModeKeys

logger = logging.getLogger("torch_tpu_estimator")

LOG_EVERY_SECONDS = 10.0
_VERBS = {ModeKeys.TRAIN: "train", ModeKeys.EVAL: "evaluate", ModeKeys.PREDICT: "predict"}


def progress_hooks(style: str) -> list[Hook]:
    """The progress display for RunConfig.progress, or none."""
    if style == "auto":
        style = "bar" if sys.stderr.isatty() else "log"
    return [] if style == "off" else [ProgressDisplay(bar=style == "bar")]


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class ProgressDisplay(Hook):
    """Steps or examples done of the total, rate, time left, last loss; on the chief only."""

    def __init__(self, bar: bool):
        self.bar = bar
        self.done, self.total, self.loss = 0, None, None

    def begin(self, context: RunContext) -> None:
        self.active = context.is_chief
        self.training = context.mode == ModeKeys.TRAIN
        self.unit = "step" if self.training else "example"
        self.total = context.total_steps if self.training else context.total_examples
        self.started = self.last_logged = time.perf_counter()
        self.done, self.loss = 0, None
        self._bar = None
        if self.active and self.bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, unit=self.unit, desc=_VERBS[context.mode],
                             file=sys.stderr, dynamic_ncols=True)

    def after_window(self, context: RunContext, window: Window) -> None:
        if not self.active:
            return
        count = window.last_step - window.first_step if self.training else window.examples
        self.done += count
        if self.training and len(window.losses):
            self.loss = window.loss
        if self._bar is not None:
            if self.loss is not None:
                self._bar.set_postfix(loss=f"{self.loss:.4g}", refresh=False)
            self._bar.update(count)
        elif time.perf_counter() - self.last_logged >= LOG_EVERY_SECONDS:
            self.last_logged = time.perf_counter()
            logger.info("%s", self.line(context))

    def line(self, context: RunContext) -> str:
        """`train: step 400 of 1000 (40%), 85.2 steps/s, 0:07 left, loss 0.23`."""
        seconds = time.perf_counter() - self.started
        rate = self.done / seconds if seconds > 0 else 0.0
        text = f"{_VERBS[context.mode]}: {self.unit} {self.done}"
        if self.total:
            text += f" of {self.total} ({100 * self.done / self.total:.0f}%)"
        text += f", {rate:.1f} {self.unit}s/s"
        if self.total and rate > 0:
            text += f", {_duration((self.total - self.done) / rate)} left"
        if self.loss is not None:
            text += f", loss {self.loss:.4g}"
        return text

    def end(self, context: RunContext) -> None:
        if not self.active:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            logger.info("%s, done in %s", self.line(context),
                        _duration(time.perf_counter() - self.started))
