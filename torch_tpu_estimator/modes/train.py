"""Training on one replica: the update step each step, losses read back once per window,
checkpoints at window ends, SIGTERM and a second trainer handled.

Inside a window nothing is read back from the device: each step's loss stays a device tensor,
and the window's losses come to the host in one transfer once the window ends. Hooks, logs,
summaries and checkpoint decisions happen there and only there.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..api.hooks import Hook, LoggingHook, NanLossGuard, Window
from ..api.job import InputFn, Job
from ..api.spec import ModeKeys, call_with_tensors
from ..common.tree import map_tensors
from ..input.batches import HostBatch
from ..observability.progress import progress_hooks
from ..observability.run_record import RunRecordHook
from ..observability.summary import TrainSummaryHook
from ..runtime.base import Replica
from ..state import checkpoint
from ..state.checkpoint import latest_checkpoint
from ..state.lease import exclusive
from ..state.run_state import RunState
from ..state.schema import Checkpoint
from ..state.uploads import BackgroundPublisher, publishing
from ..state.warm_start import warm_start
from ..step.building import build_run_state
from ..step.context import ModeContext
from ..step.gather import real_examples
from ..step.loop import ModeProgram, StepRunner, run_to_end
from ..step.preemption import TerminationRequest
from ..step.windows import WindowedBatches, steps_to_next_stop

logger = logging.getLogger("torch_tpu_estimator")


def train_replica(job: Job, replica: Replica, input_fn: InputFn, hooks: Sequence[Hook],
                  steps: int | None, max_steps: int | None) -> bool:
    """Trains on this replica until the target step, a hook's stop, the input's end or SIGTERM;
    returns whether SIGTERM ended it.

    The chief holds model_dir's lock (a bucket's lease) throughout: a second trainer is
    refused, and a model_dir it cannot write is found before the first step.
    """
    ctx = ModeContext(job, replica, ModeKeys.TRAIN)
    if max_steps is not None:  # nothing to write: no lock, a read-only model_dir will do
        latest = latest_checkpoint(job.model_dir)
        if latest is not None and checkpoint.step_of(latest) >= max_steps:
            logger.info("Skipping training: global step %d is already at max_steps %d",
                        checkpoint.step_of(latest), max_steps)
            return False
    with contextlib.ExitStack() as stack:
        still_owner = stack.enter_context(exclusive(job.model_dir)) if replica.is_chief \
            else None
        if still_owner is not None:
            checkpoint.start_index(job.model_dir)
        publisher = stack.enter_context(publishing())  # before the lease is released
        interrupt = stack.enter_context(TerminationRequest())
        one_pass = steps is None and max_steps is None and \
            job.config.dataset_config.num_epochs is None
        streams = ctx.input_streams(input_fn, one_pass)
        state = build_run_state(ctx, streams)
        _restore_or_warm_start(ctx, state)
        target = max_steps if max_steps is not None else (
            state.global_step + steps if steps is not None else None)
        windows = WindowedBatches(replica.device_batches(streams.host_batches()), ctx.plan,
                                  replica, interrupt)
        program = TrainProgram(ctx, state, target, hooks, still_owner, publisher)
        program.context.total_steps = None if target is None else target - state.global_step
        state.model.train()
        preempted = run_to_end(program, windows, program.hooks, interrupt)
        if windows.exhausted:
            logger.info("Input ended at global step %d%s", state.global_step, (
                ": one pass over the data, as train() was given no steps or max_steps and "
                "DatasetConfig no num_epochs" if one_pass else ""))
        return preempted


def _restore_or_warm_start(ctx: ModeContext, state: RunState) -> None:
    """Restores the latest checkpoint of model_dir, or warm starts the module's weights."""
    latest = latest_checkpoint(ctx.model_dir)
    if latest is not None:
        state.restore(Checkpoint.load(latest))
        logger.info("Restored %s (global step %d)", latest, state.global_step)
    elif ctx.job.warm_start_from is not None:
        warm_start(state.model, ctx.job.warm_start_from)
        state.update.weights_replaced()  # the EMA, if any, starts at the warm-started weights


class TrainProgram(ModeProgram):
    """Training in the loop: update steps, loss windows, host_call, periodic checkpoints."""

    def __init__(self, ctx: ModeContext, state: RunState, target: int | None,
                 user_hooks: Sequence[Hook], still_owner: Callable[[], None] | None = None,
                 publisher: BackgroundPublisher | None = None):
        super().__init__(ctx, state.global_step)
        self.state, self.target = state, target
        self.still_owner = still_owner  # raises once another trainer took model_dir over
        self.publisher = publisher  # a bucket's uploads, in the background
        self.params = ctx.model_params()
        config = ctx.config
        self.hooks: list[Hook] = [NanLossGuard()]
        if config.log_step_count_steps:
            self.hooks.append(LoggingHook(config.log_step_count_steps))
        if config.save_summary_steps:
            self.hooks.append(TrainSummaryHook(ctx.model_dir, config.save_summary_steps))
        self.hooks.extend(progress_hooks(config.progress))
        self.hooks.append(RunRecordHook(ctx.job, ctx.replica.topology.name))
        self.hooks.extend(user_hooks)
        self.last_saved_step, self.last_saved_time = state.global_step, checkpoint.now()
        self.learning_rates: list[dict[str, float]] = []
        self.host_call_fn: Callable[..., Any] | None = None
        self.host_call_every = config.tpu_config.experimental_host_call_every_n_steps
        self.replayed: Any = None  # the replayed steps' runner, with replay_training

    def steps_left(self) -> float:
        return steps_to_next_stop(self.state.global_step, self.target,
                                  [*self.hooks, *(self.spec_hooks or ())])

    def step(self, batch: HostBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        return self.finish_step(batch, self.traced_step(batch))

    def traced_step(self, batch: HostBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor], Any]:
        """model_fn and the update on `batch`, traced: the loss, the update's scalars and
        host_call's tensors (every step: finish_step keeps those due), still on the device."""
        update = self.state.update
        self.learning_rates.append(update.learning_rates())
        spec = update.run(
            lambda features, labels, params, update: self.ctx.call_model_fn(
                self.state.model, features, labels, params, update),
            batch.features, batch.labels, self.params, self.state.global_step + 1)
        self.note_spec_hooks(spec)
        host_call = None
        if spec.host_call is not None:
            self.host_call_fn, tensors = spec.host_call
            host_call = map_tensors(torch.Tensor.detach, tensors)
        return spec.loss.detach(), update.scalars, host_call

    def replayed_host_part(self) -> list[torch.Tensor]:
        """What a replayed step does on the host before it runs; returns the update's numbers."""
        self.learning_rates.append(self.state.update.learning_rates())
        self.state.update.global_step = self.state.global_step + 1
        from ..step.train_replay import replayed_host_step  # torch_xla: imported when used

        return replayed_host_step(self.state.update)

    def finish_step(self, batch: HostBatch, outputs: tuple) -> tuple:
        """After a step, traced or replayed: the global step advances; host_call's tensors are
        kept on every n-th step (TPUConfig.experimental_host_call_every_n_steps)."""
        self.state.advance(batch)
        loss, scalars, host_call = outputs
        if self.state.global_step % self.host_call_every != 0:
            host_call = None
        return loss, scalars, host_call

    def group_runner(self, run_step: StepRunner) -> Callable[[list[HostBatch]], list[Any]]:
        """Traced steps, or replayed ones where TPUConfig.replay_training asks for it."""
        if not self.ctx.plan.replay_training:
            if self.ctx.config.tpu_config.replay_training:
                logger.info("replay_training: every training step is traced, because %s with %d "
                            "process(es) does not replay (one process on XLA does: one device "
                            "or an SPMD mesh)", type(self.ctx.replica).__name__,
                            self.ctx.replica.topology.num_processes)
            return super().group_runner(run_step)
        from ..step.train_replay import ReplayedTraining  # torch_xla: imported when used

        self.replayed = ReplayedTraining(self, self.state.update, self.state.model, run_step,
                                         self.ctx.replica.readable, self.ctx.plan.max_graphs)
        return self.replayed

    def window_end(self, outputs: list[Any], batches: list[HostBatch],
                   seconds: float) -> tuple[Window, None]:
        replica = self.ctx.replica
        first_step = self.context.global_step
        losses, scalars, host_call_tensors = replica.to_host(
            [list(column) for column in zip(*outputs, strict=True)])
        if self.host_call_fn is not None:
            self._run_host_call(host_call_tensors, first_step)
        names = sorted({name for step_scalars in scalars for name in step_scalars})
        rows = replica.host_mean(np.array(  # every replica's in one collective
            [[float(loss) for loss in losses],
             *([float(step_scalars.get(name, math.nan)) for step_scalars in scalars]
               for name in names)], dtype=np.float64))
        window = Window(first_step=first_step, last_step=self.state.global_step, losses=rows[0],
                        group_learning_rates=self.learning_rates, seconds=seconds,
                        examples=len(outputs) * self.ctx.global_batch_size,
                        scalars=dict(zip(names, rows[1:], strict=True)))
        self.learning_rates = []
        self.context.global_step = self.state.global_step
        if self.replayed is not None:
            self.replayed.window_ended()
        return window, None

    def _run_host_call(self, per_step: list[Any], first_step: int) -> None:
        """Calls a TRAIN spec's host_call fn on the chief once per step of the window that kept
        its tensors (every n-th: TPUConfig.experimental_host_call_every_n_steps), with that
        step's tensors gathered from every replica (and `global_step=` when fn takes it)."""
        gathered = self.ctx.replica.host_gather(per_step)
        if not self.ctx.is_chief:
            return
        takes_step = "global_step" in inspect.signature(self.host_call_fn).parameters
        for index in range(len(per_step)):
            if per_step[index] is None:
                continue
            tensors = real_examples([[replica[index]] for replica in gathered],
                                    [[self.params["batch_size"]]] * len(gathered))
            extra = {"global_step": first_step + index + 1} if takes_step else {}
            call_with_tensors(self.host_call_fn, tensors, **extra)

    def after_hooks(self, window: Window, hooks: Sequence[Hook]) -> None:
        config = self.ctx.config
        due = config.save_checkpoints_steps is not None and \
            self.state.global_step - self.last_saved_step >= config.save_checkpoints_steps
        if config.save_checkpoints_secs is not None:  # the chief's clock decides for everyone
            due = self.ctx.replica.host_gather(
                due or checkpoint.now() - self.last_saved_time >= config.save_checkpoints_secs)[0]
        if due:
            self._save(hooks)

    def finish(self, hooks: Sequence[Hook], preempted: bool) -> None:
        if self.state.global_step != self.last_saved_step:
            self._save(hooks)
        if preempted and self.ctx.is_chief:
            logger.warning("SIGTERM: stopped at global step %d and wrote its checkpoint; run the "
                           "same call again to continue from there", self.state.global_step)

    def _save(self, hooks: Sequence[Hook]) -> None:
        """Writes a checkpoint from the chief (every process gives its RNGs and input position),
        with the hooks' before_save / after_save around it; the others wait at a barrier."""
        tree = self.state.capture()
        if self.ctx.is_chief:
            for hook in hooks:
                hook.before_save(self.context)
            path = checkpoint.save_checkpoint(self.ctx.model_dir, self.state.global_step, tree,
                                              self.ctx.replica.to_host,
                                              self.ctx.config.keep_checkpoint_max,
                                              self.ctx.config.keep_checkpoint_every_n_hours,
                                              self.still_owner, self.publisher)
            for hook in hooks:
                hook.after_save(self.context, path)
        self.ctx.replica.barrier("checkpoint_saved")
        self.last_saved_step, self.last_saved_time = self.state.global_step, checkpoint.now()
