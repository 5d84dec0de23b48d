"""The hook protocol and the built-in hooks.

One protocol for every mode and phase: `begin`, `after_window` (every `iterations_per_loop`
steps, never inside a window, so hooks cost no device sync), `before_save` / `after_save`
(around each checkpoint in training), `after_evaluation` (train_and_evaluate) and `end`. A hook
may call `context.request_stop()` in any mode; the run ends at that window's end. Every replica
runs the same hooks on the same values (losses are averaged over replicas first);
`context.is_chief` tells a hook whether to write.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .spec import ModeKeys

logger = logging.getLogger("torch_tpu_estimator")


class NanLossDuringTrainingError(RuntimeError):
    """Training produced a NaN or infinite loss; no checkpoint was written for that window."""


@dataclasses.dataclass
class Window:
    """What one window of steps produced, read back to the host once.

    Attributes:
        first_step: the global step before the window's first step.
        last_step: the global step after the window's last step.
        losses: TRAIN: one loss per step, the replicas' mean; EVAL: one per real example.
        seconds: the window's wall time.
        examples: the global examples the window consumed.
        group_learning_rates: TRAIN: one mapping per step, every parameter group's rate by
            "<optimizer>/<group index>".
        scalars: TRAIN: the update step's named scalars (the gradient norm before clipping),
            one value per step, the replicas' mean; NaN in a step that did not compute it.
    """

    first_step: int
    last_step: int
    losses: np.ndarray
    seconds: float
    examples: int
    group_learning_rates: Sequence[Mapping[str, float]] = ()
    scalars: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def learning_rates(self) -> list[float]:
        """One per step (TRAIN): the first parameter group's learning rate, as TF reports it."""
        return [next(iter(rates.values())) for rates in self.group_learning_rates]

    @property
    def loss(self) -> float:
        """The window's last loss; NaN when it has none (prediction, or only padding)."""
        return float(self.losses[-1]) if len(self.losses) else math.nan


@dataclasses.dataclass
class RunContext:
    """What hooks may read, and their way to end the run at the next window end.

    Attributes:
        mode: the call's ModeKeys value ("train", "eval" or "infer").
        global_step: the global step, kept current at every window end.
        is_chief: whether this process is the chief replica (the one that writes).
        model_dir: the run's model_dir (a folder or a URL).
        stop_requested: set by request_stop(): the run ends at the next window end.
        total_steps: train: the steps this call will run, when known.
        total_examples: evaluate, predict: the examples to read, when known.
    """

    mode: str
    global_step: int
    is_chief: bool
    model_dir: str | None
    stop_requested: bool = False
    total_steps: int | None = None
    total_examples: int | None = None

    def request_stop(self) -> None:
        """Ends the run at the next window end (after that window's checkpoint, if due)."""
        self.stop_requested = True


class Hook:
    """Override any phase; each gets the RunContext."""

    def begin(self, context: RunContext) -> None:
        """Before the first step of train / evaluate / predict."""

    def after_window(self, context: RunContext, window: Window) -> None:
        """After each window of steps, with its per-step losses on the host."""

    def before_save(self, context: RunContext) -> None:
        """Training, on the chief: before the checkpoint of context.global_step is written."""

    def after_save(self, context: RunContext, path: str) -> None:
        """Training, on the chief: after the checkpoint of context.global_step is written."""

    def after_evaluation(self, context: RunContext, results: dict[str, float],
                         checkpoint_path: str) -> None:
        """train_and_evaluate: after each evaluation of `checkpoint_path`.

        context.request_stop() ends the training.
        """

    def end(self, context: RunContext) -> None:
        """After the last window, once the final checkpoint (if any) is written."""

    def last_step(self) -> int | None:
        """The global step this hook will stop at, if any, so the last window ends exactly there."""
        return None


class CheckpointSaverListener(Hook):
    """TF's name for the hooks given as `train(saving_listeners=...)`.

    Any Hook: its before_save / after_save phases run around each checkpoint.
    """


class StopAtStepHook(Hook):
    """Stops after `num_steps` more steps, or at global step `last_step` (TF's hook).

    Args:
        num_steps: how many steps this call runs before it stops (counted from its start).
        last_step: the global step at which to stop. Give exactly one of the two.
    """

    def __init__(self, num_steps: int | None = None, last_step: int | None = None):
        if (num_steps is None) == (last_step is None):
            raise ValueError("StopAtStepHook takes exactly one of num_steps and last_step")
        self._num_steps = num_steps
        self._last_step = last_step

    def begin(self, context: RunContext) -> None:
        """Fixes the stopping step once the run's starting step is known."""
        if self._num_steps is not None:
            self._last_step = context.global_step + self._num_steps

    def last_step(self) -> int | None:
        """The global step at which the run stops (None until begin with num_steps)."""
        return self._last_step

    def after_window(self, context: RunContext, window: Window) -> None:
        """Requests the stop once the window reaches the last step."""
        if self._last_step is not None and window.last_step >= self._last_step:
            context.request_stop()


class NanLossGuard(Hook):
    """Raises NanLossDuringTrainingError when any step of a window had a non-finite loss."""

    def after_window(self, context: RunContext, window: Window) -> None:
        """Raises NanLossDuringTrainingError naming the first non-finite step."""
        bad = np.flatnonzero(~np.isfinite(window.losses))
        if bad.size:
            step = window.first_step + int(bad[0]) + 1
            raise NanLossDuringTrainingError(
                f"model_fn's loss is {window.losses[bad[0]]} at global step {step}; "
                "stopped before writing a checkpoint for it"
            )


class LossHistory(Hook):
    """Keeps every training step's loss (the replica mean) as windows bring them back.

    For a notebook or a script to plot or check; `first` and `last` are None until a window ends.
    """

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []

    def after_window(self, context: RunContext, window: Window) -> None:
        """Keeps the window's per-step losses (training windows only)."""
        if context.mode == ModeKeys.TRAIN:
            self.steps.extend(range(window.first_step + 1, window.last_step + 1))
            self.losses.extend(float(loss) for loss in window.losses)

    @property
    def first(self) -> float | None:
        """The first step's loss, or None before a window ends."""
        return self.losses[0] if self.losses else None

    @property
    def last(self) -> float | None:
        """The last step's loss, or None before a window ends."""
        return self.losses[-1] if self.losses else None


class LoggingHook(Hook):
    """Logs `loss = …, step = …` and the step and example rates, as TF does, on the chief.

    Args:
        every_n_steps: logs at the first window end once this many steps have passed since
            the last log.
    """

    def __init__(self, every_n_steps: int):
        self.every_n_steps = every_n_steps
        self._last_logged = 0
        self._steps, self._seconds, self._examples = 0, 0.0, 0

    def begin(self, context: RunContext) -> None:
        """Counts this call's steps from its starting step."""
        self._last_logged = context.global_step

    def after_window(self, context: RunContext, window: Window) -> None:
        """Logs the window's loss and rates once `every_n_steps` have passed."""
        self._steps += window.last_step - window.first_step
        self._seconds += window.seconds
        self._examples += window.examples
        if not context.is_chief or window.last_step - self._last_logged < self.every_n_steps:
            return
        logger.info("loss = %.6g, step = %d", window.loss, window.last_step)
        if self._seconds > 0:
            logger.info("global_step/sec: %.4g", self._steps / self._seconds)
            logger.info("examples/sec: %.4g", self._examples / self._seconds)
        self._last_logged = window.last_step
        self._steps, self._seconds, self._examples = 0, 0.0, 0


def require_hooks(name: str, hooks: Sequence[Any] | None) -> list[Hook]:
    """`hooks` as a list, or a TypeError naming `name` if one of them is not a Hook."""
    hooks = list(hooks or ())
    for hook in hooks:
        if not isinstance(hook, Hook):
            raise TypeError(f"{name} must hold Hook instances, got {type(hook).__name__}")
    return hooks


def steps_in_window(window: Window, every_n_steps: int) -> list[int]:
    """The global steps of a window that fall on a multiple of every_n_steps."""
    first = math.floor(window.first_step / every_n_steps) * every_n_steps + every_n_steps
    return list(range(first, window.last_step + 1, every_n_steps))


