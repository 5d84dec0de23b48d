"""One loop for train, evaluate and predict: windows of steps on the device (run one step, or in
evaluate and predict one group of steps, per program), host work at window ends, and hooks with
the same phases in every mode.

A ModeProgram says what one mode does with a step and with a window's outputs; run_loop does the
rest alike for all three: the step runner, heartbeats, one transfer per window, hooks, a stop
(the mode's own end, the input's end, a hook's request, SIGTERM) agreed by every process.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..api.hooks import Hook, RunContext, Window, require_hooks
from ..api.spec import ModeKeys
from ..input.batches import HostBatch
from ..runtime.base import Progress, Replica
from .context import ModeContext
from .preemption import TerminationRequest
from .windows import WindowedBatches, groups

logger = logging.getLogger("torch_tpu_estimator")

StepRunner = Callable[[Callable[[], Any]], Any]

_SPEC_HOOKS = {ModeKeys.TRAIN: "training_hooks", ModeKeys.EVAL: "evaluation_hooks",
               ModeKeys.PREDICT: "prediction_hooks"}


class ModeProgram(abc.ABC):
    """What one mode does inside the loop."""

    def __init__(self, ctx: ModeContext, global_step: int):
        self.ctx = ctx
        self.context = RunContext(ctx.mode, global_step, ctx.is_chief, ctx.model_dir)
        self.steps_done = 0  # steps of this call so far
        self.spec_hooks: list[Hook] | None = None  # the spec's hooks, once a step returned one

    def note_spec_hooks(self, spec: Any) -> None:
        """Keeps the hooks model_fn's first spec carries for this mode (training_hooks,
        evaluation_hooks or prediction_hooks): run_loop runs them like the call's own."""
        if self.spec_hooks is not None:
            return
        field = _SPEC_HOOKS[self.ctx.mode]
        self.spec_hooks = require_hooks(f"TPUEstimatorSpec.{field}", getattr(spec, field))

    def steps_left(self) -> float:
        """Steps this mode may still run before its own end (a target, an eval step count)."""
        return math.inf

    @abc.abstractmethod
    def step(self, batch: HostBatch) -> Any:
        """One step on the device; returns its outputs, still on the device."""

    def trace_group(self, group: list[HostBatch]) -> list[Any]:
        """A group of steps traced, their outputs laid out to be read back."""
        return [self.ctx.replica.readable(self.step(batch)) for batch in group]

    def group_runner(self, run_step: StepRunner) -> Callable[[list[HostBatch]], list[Any]]:
        """How the loop runs a group of steps: traced, and cut into one program by `run_step`."""
        return lambda group: run_step(lambda: self.trace_group(group))

    @abc.abstractmethod
    def window_end(self, outputs: list[Any], batches: list[HostBatch],
                   seconds: float) -> tuple[Window, Any]:
        """Host work once a window's outputs are read back: the Window hooks see, and what
        the loop yields (predictions), if anything."""

    def after_hooks(self, window: Window, hooks: Sequence[Hook]) -> None:
        """Host work after the hooks saw the window (training's periodic checkpoint)."""

    def finish(self, hooks: Sequence[Hook], preempted: bool) -> None:
        """Host work after the last window, before the hooks' end (training's last checkpoint)."""


def run_loop(program: ModeProgram, windows: WindowedBatches, hooks: Sequence[Hook],
             interrupt: TerminationRequest | None = None) -> Iterator[Any]:
    """Runs `program` window by window and yields what each window end gives. Returns (as the
    generator's value) whether SIGTERM, on any process, ended the run."""
    ctx, run_context = program.ctx, program.context
    replica = ctx.replica
    counters = replica.device_counters()
    hooks = list(hooks)
    for hook in hooks:
        hook.begin(run_context)
    run_group = program.group_runner(ctx.step_runner())
    preempted, adopted = False, False
    try:
        while True:
            outputs, batches = [], []
            for group in groups(windows.window(program.steps_left()), ctx.plan.steps_per_program):
                replica.heartbeat(Progress.MODEL_FN, program.steps_done + 1)
                outputs.extend(run_group(group))
                batches.extend(group)
                program.steps_done += len(group)
                replica.heartbeat(Progress.INPUT, program.steps_done + 1)
                if not adopted and program.spec_hooks is not None:
                    adopted = True
                    for hook in program.spec_hooks:
                        hook.begin(run_context)
                    hooks.extend(program.spec_hooks)
            replica.heartbeat(Progress.HOST, program.steps_done + 1)
            if outputs:
                window, result = program.window_end(outputs, batches, windows.seconds())
                for hook in hooks:
                    hook.after_window(run_context, window)
                program.after_hooks(window, hooks)
                if result is not None:
                    yield result
            stops = replica.host_gather((windows.exhausted or program.steps_left() <= 0
                                         or run_context.stop_requested,
                                         interrupt is not None and interrupt.requested))
            preempted = any(signalled for _, signalled in stops)
            if preempted or any(stop for stop, _ in stops):
                break
    finally:
        windows.close()
    program.finish(hooks, preempted)
    for hook in hooks:
        hook.end(run_context)
    log_device_report(replica, ctx.mode, counters)
    return preempted


def run_to_end(program: ModeProgram, windows: WindowedBatches, hooks: Sequence[Hook],
               interrupt: TerminationRequest | None = None) -> bool:
    """run_loop for a mode that yields nothing (train, evaluate); returns whether SIGTERM
    ended it."""
    loop = run_loop(program, windows, hooks, interrupt)
    while True:
        try:
            next(loop)
        except StopIteration as done:
            return bool(done.value)


def log_device_report(replica: Replica, mode: str, before: dict[str, float]) -> None:
    """Logs what the call cost the device: compilations (and their time), executions and
    device-to-host transfers, counted since `before` (replica.device_counters())."""
    after = replica.device_counters()
    if not after:
        return
    spent = {key: after[key] - before.get(key, 0) for key in after}
    logger.info("%s on XLA: %d compilation(s) in %.2f s, %d execution(s), %d device-to-host "
                "transfer(s) (one per window%s)", mode, spent["compilations"],
                spent["compile_seconds"], spent["executions"], spent["transfers_to_host"],
                ", and one per checkpoint written" if mode == ModeKeys.TRAIN else "")
