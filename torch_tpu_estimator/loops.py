"""The train loop over any runtime: a traced step, windows of steps, host work at window ends.

Inside a window nothing is read back from the device: each step's loss stays a device tensor,
and the window's losses come to the host in one transfer once the window ends. Hooks, logs,
summaries and checkpoint decisions happen there and only there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .checkpoint import latest_checkpoint, resolve_checkpoint_path, save_checkpoint
from .config import RunConfig
from .gather import real_examples
from .hooks import CheckpointSaverListener, Hook, LoggingHook, NanLossGuard, RunContext, Window
from .input import HostBatch, InputPosition
from .job import InputFn, Job
from .locking import model_dir_lock
from .preemption import TerminationRequest
from .runtime.base import Progress, Runtime
from .spec import ModeKeys, call_with_tensors, validate_spec
from .summary import TrainSummaryHook
from .training_state import TrainingState, capture_rng
from .tree import map_tensors

logger = logging.getLogger("torch_tpu_estimator")

class _CheckpointSaver:
    """Writes a checkpoint from the chief every `save_checkpoints_steps`, and at the end."""

    def __init__(self, job: Job, runtime: Runtime, listeners: Sequence[CheckpointSaverListener],
                 last_saved_step: int):
        self.job, self.runtime, self.listeners = job, runtime, listeners
        self.last_saved_step = last_saved_step

    def maybe_save(self, state: TrainingState, final: bool = False) -> None:
        every = self.job.config.save_checkpoints_steps
        due = final or (every is not None and state.global_step - self.last_saved_step >= every)
        if not due or state.global_step == self.last_saved_step:
            return
        gathered = self.runtime.host_gather((state.positions, capture_rng(self.runtime)))
        positions = {key: value for replica, _ in gathered for key, value in replica.items()}
        if self.runtime.is_chief:
            snapshot = state.capture(self.runtime, positions, [rng for _, rng in gathered])
            for listener in self.listeners:
                listener.before_save(state.global_step)
            path = save_checkpoint(self.job.model_dir, snapshot, self.job.config.keep_checkpoint_max)
            for listener in self.listeners:
                listener.after_save(state.global_step, path)
        self.runtime.barrier("checkpoint_saved")
        self.last_saved_step = state.global_step


class WindowedBatches:
    """Hands out a run's device batches window by window; remembers when the input ended.

    Every process must run the same steps in a window (their collectives pair up). With step
    count windows over per-host input they do by construction. Otherwise (`agree_each_step`)
    the processes agree before each step, in one host collective, on whether any stream has
    ended and whether the chief's time budget is spent. One batch is read ahead for that, and
    kept for the next window when this one ends first.
    """

    def __init__(self, batches: Iterator[HostBatch], config: RunConfig, runtime: Runtime,
                 agree_each_step: bool = False, interrupt: TerminationRequest | None = None):
        self.batches = batches
        self.runtime = runtime
        self.agree_each_step = agree_each_step
        # one process stops after the step in flight; several stop together at the window end
        self.interrupt = interrupt if runtime.num_processes == 1 else None
        self.window_steps = config.tpu_config.window_steps or math.inf
        self.window_seconds = config.tpu_config.window_seconds or math.inf
        self.exhausted = False
        self.started = time.perf_counter()
        self._ahead: HostBatch | None = None

    def window(self, limit: float = math.inf) -> Iterator[HostBatch]:
        """The next window's batches: at most `limit` and the window size, within its time budget."""
        self.started = time.perf_counter()
        count, limit = 0, min(limit, self.window_steps)
        while count < limit and not self.exhausted:
            if self.interrupt is not None and self.interrupt.requested:
                return
            if self._ahead is None:
                self._ahead = next(self.batches, None)
            ended = self._ahead is None
            time_up = (self.window_seconds < math.inf and self.runtime.is_chief
                       and self.seconds() >= self.window_seconds)
            if self.agree_each_step:
                flags = self.runtime.host_gather((ended, time_up))
                ended, time_up = any(flag[0] for flag in flags), any(flag[1] for flag in flags)
            if ended:
                self.exhausted = True
            if ended or time_up:
                return
            batch, self._ahead = self._ahead, None
            count += 1
            yield batch

    def seconds(self) -> float:
        """Time since the current window started."""
        return time.perf_counter() - self.started


def _train_step(job: Job, runtime: Runtime, state: TrainingState, batch: HostBatch,
                params: dict, step: int) -> tuple[torch.Tensor, Any]:
    """Global step `step` on one batch; returns the detached loss and the spec's host_call."""
    runtime.heartbeat(Progress.MODEL_FN, step)
    state.optimizer.zero_grad(set_to_none=True)
    spec = validate_spec(
        job.model_fn(state.model, batch.features, batch.labels, ModeKeys.TRAIN, params),
        ModeKeys.TRAIN,
    )
    runtime.heartbeat(Progress.UPDATE, step)
    spec.loss.backward()
    runtime.optimizer_step(state.optimizer)
    if state.scheduler is not None:
        state.scheduler.step()
    return spec.loss.detach(), spec.host_call


def log_device_report(runtime: Runtime, mode: str, before: dict[str, float]) -> None:
    """Logs what the call cost the device: compilations (and their time), executions and
    device-to-host transfers, counted since `before` (runtime.device_counters())."""
    after = runtime.device_counters()
    if not after:
        return
    spent = {key: after[key] - before.get(key, 0) for key in after}
    logger.info("%s on XLA: %d compilation(s) in %.2f s, %d execution(s), %d device-to-host "
                "transfer(s)", mode, spent["compilations"], spent["compile_seconds"],
                spent["executions"], spent["transfers_to_host"])


def _run_host_call(runtime: Runtime, fn: Callable[..., Any], per_step: list[Any],
                   first_step: int, batch_size: int) -> None:
    """Calls a TRAIN spec's host_call fn on the chief once per step of the window, with that
    step's tensors gathered from every replica (and `global_step=` when fn takes it)."""
    gathered = runtime.host_gather(per_step)
    if not runtime.is_chief:
        return
    takes_step = "global_step" in inspect.signature(fn).parameters
    for index in range(len(per_step)):
        tensors = real_examples([[replica[index]] for replica in gathered],
                                [[batch_size]] * len(gathered))
        extra = {"global_step": first_step + index + 1} if takes_step else {}
        call_with_tensors(fn, tensors, **extra)


def _steps_to_next_stop(step: int, target: int | None, hooks: Sequence[Hook]) -> float:
    """Steps left before the target or a hook's last step, so the last window lands on it."""
    stops = [target] + [hook.last_step() for hook in hooks]
    return min([stop - step for stop in stops if stop is not None], default=math.inf)


def _restore_or_warm_start(job: Job, runtime: Runtime, state: TrainingState) -> int:
    """Restores the latest checkpoint of model_dir, or warm starts; returns the restored step."""
    latest = latest_checkpoint(job.model_dir)
    if latest is not None:
        state.restore(latest, runtime)
        logger.info("Restored %s (global step %d)", latest, state.global_step)
    elif job.warm_start_from is not None:
        source = resolve_checkpoint_path(job.warm_start_from)
        state.restore(source, runtime, weights_only=True)
        logger.info("Warm started the model's weights from %s", source)
    return state.global_step


def open_windows(job: Job, runtime: Runtime, mode: str, input_fn: InputFn,
                 positions: dict[str, InputPosition] | None = None,
                 interrupt: TerminationRequest | None = None) -> WindowedBatches:
    """Calls input_fn and opens this process's device batches, window by window."""
    positions = positions or {}
    batches = runtime.device_batches(job.host_batches(runtime, mode, input_fn, positions))
    return WindowedBatches(batches, job.config, runtime, job.agrees_each_step(runtime, mode),
                           interrupt)


@dataclasses.dataclass(frozen=True)
class TrainOutcome:
    """How a replica's training ended: its global step, and whether SIGTERM ended it."""

    global_step: int
    preempted: bool = False


def train_replica(
    job: Job,
    runtime: Runtime,
    input_fn: InputFn,
    hooks: Sequence[Hook],
    steps: int | None,
    max_steps: int | None,
    saving_listeners: Sequence[CheckpointSaverListener],
) -> TrainOutcome:
    """Trains on this replica until the target step, a hook's stop, the input's end or SIGTERM.

    The chief holds model_dir's lock throughout: a second trainer is refused, and a model_dir
    it cannot write is found before the first step.
    """
    with contextlib.ExitStack() as stack:
        if runtime.is_chief:
            stack.enter_context(model_dir_lock(job.model_dir))
        interrupt = stack.enter_context(TerminationRequest())
        return _train(job, runtime, input_fn, hooks, steps, max_steps, saving_listeners,
                      interrupt)


def _train(job: Job, runtime: Runtime, input_fn: InputFn, hooks: Sequence[Hook],
           steps: int | None, max_steps: int | None,
           saving_listeners: Sequence[CheckpointSaverListener],
           interrupt: TerminationRequest) -> TrainOutcome:
    counters = runtime.device_counters()
    model_params = job.model_params(runtime, ModeKeys.TRAIN)
    state = TrainingState.build(runtime, job.model_init_fn, job.optimizer_fn, model_params,
                                job.config.seed)
    restored_step = _restore_or_warm_start(job, runtime, state)
    target = max_steps if max_steps is not None else (
        restored_step + steps if steps is not None else None)
    if target is not None and restored_step >= target:
        logger.info("Skipping training: global step %d is already at max_steps %d",
                    restored_step, target)
        return TrainOutcome(restored_step)

    state.positions = job.own_positions(runtime, state.positions)
    windows = open_windows(job, runtime, ModeKeys.TRAIN, input_fn, state.positions, interrupt)
    config = job.config
    all_hooks: list[Hook] = [NanLossGuard()]
    if config.log_step_count_steps:
        all_hooks.append(LoggingHook(config.log_step_count_steps))
    if config.save_summary_steps:
        all_hooks.append(TrainSummaryHook(job.model_dir, config.save_summary_steps))
    all_hooks.extend(hooks)
    saver = _CheckpointSaver(job, runtime, saving_listeners, last_saved_step=restored_step)
    context = RunContext(ModeKeys.TRAIN, state.global_step, runtime.is_chief, job.model_dir)
    for listener in saving_listeners:
        listener.begin()
    for hook in all_hooks:
        hook.begin(context)

    state.model.train()
    try:
        preempted = _run_windows(job, runtime, state, windows, model_params, target, all_hooks,
                                 context, saver, interrupt)
    finally:
        windows.batches.close()
    saver.maybe_save(state, final=True)
    if preempted and runtime.is_chief:
        logger.warning("SIGTERM: stopped at global step %d and wrote its checkpoint; run the "
                       "same call again to continue from there", state.global_step)
    for hook in all_hooks:
        hook.end(context)
    for listener in saving_listeners:
        listener.end(state.global_step)
    log_device_report(runtime, ModeKeys.TRAIN, counters)
    return TrainOutcome(state.global_step, preempted)


def _run_windows(job: Job, runtime: Runtime, state: TrainingState, windows: WindowedBatches,
                 model_params: dict, target: int | None, hooks: Sequence[Hook],
                 context: RunContext, saver: _CheckpointSaver,
                 interrupt: TerminationRequest) -> bool:
    """Runs windows until a stop; returns whether SIGTERM (on any process) was the stop."""
    run_step = runtime.step_runner(ModeKeys.TRAIN,
                                   job.config.tpu_config.max_graphs(ModeKeys.TRAIN))
    while True:
        losses: list[torch.Tensor] = []
        learning_rates: list[float] = []
        host_call_tensors: list[Any] = []
        host_call_fn = None
        steps_left = _steps_to_next_stop(state.global_step, target, hooks)
        for batch in windows.window(steps_left):
            learning_rates.append(state.learning_rate())
            step = state.global_step + len(losses) + 1
            loss, host_call = run_step(
                lambda batch=batch, step=step: _train_step(job, runtime, state, batch,
                                                           model_params, step))
            runtime.heartbeat(Progress.INPUT, step + 1)
            losses.append(loss)
            if host_call is not None:
                host_call_fn, tensors = host_call
                host_call_tensors.append(map_tensors(torch.Tensor.detach, tensors))
            state.positions.update(batch.positions)
        runtime.heartbeat(Progress.HOST, state.global_step + len(losses))
        if losses:
            host_losses, host_call_tensors = runtime.to_host([losses, host_call_tensors])
            if host_call_fn is not None:
                _run_host_call(runtime, host_call_fn, host_call_tensors, state.global_step,
                               model_params["batch_size"])
            host_losses = torch.stack(host_losses).double().numpy()
            window = Window(
                first_step=state.global_step,
                last_step=state.global_step + len(losses),
                losses=runtime.host_mean(host_losses),
                learning_rates=learning_rates,
                seconds=windows.seconds(),
                examples=len(losses) * job.global_batch_size,
            )
            state.global_step = context.global_step = window.last_step
            for hook in hooks:
                hook.after_window(context, window)
            saver.maybe_save(state)
        reached = steps_left <= len(losses)  # the target, or a hook's last step (maybe passed)
        stops = runtime.host_gather((windows.exhausted or reached or context.stop_requested,
                                     interrupt.requested))
        if any(stop for stop, _ in stops) or any(preempted for _, preempted in stops):
            if windows.exhausted:
                logger.info("Input ended at global step %d", state.global_step)
            return any(preempted for _, preempted in stops)
