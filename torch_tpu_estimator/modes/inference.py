"""Evaluate and predict on one replica: fixed-shape padded batches, one transfer per window, exact
results.

Each step's outputs stay on the device until its window ends; they then come to the host in one
transfer, are gathered from every replica, stripped of padding (input.py pads the last batch and
counts its real rows) and put back in input order by gather.real_examples.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..api.hooks import Hook, Window
from ..api.job import InputFn, Job
from ..api.metrics import Metric
from ..api.spec import ModeKeys, call_with_tensors
from ..input.batches import HostBatch
from ..observability.progress import progress_hooks
from ..observability.run_record import write_hparams
from ..observability.summary import eval_dir, write_error, write_scalars
from ..runtime.base import Replica
from ..state.run_state import RunState
from ..state.schema import Checkpoint
from ..step.building import build_run_state
from ..step.context import ModeContext
from ..step.gather import real_examples
from ..step.loop import ModeProgram, StepRunner, run_loop, run_to_end
from ..step.update_state import inference_weights
from ..step.windows import WindowedBatches

logger = logging.getLogger("torch_tpu_estimator")


def _restored(ctx: ModeContext, checkpoint_path: str) -> RunState:
    state = build_run_state(ctx)
    saved = Checkpoint.load(checkpoint_path)
    state.load_weights(inference_weights(saved, ctx.config.update_config.ema_for_inference,
                                         state.model_layout()), saved)
    state.model.eval()
    return state


def _windows(ctx: ModeContext, input_fn: InputFn, program: ModeProgram,
             steps: int | None = None) -> WindowedBatches:
    """The device batches of one pass; the program's context learns how many examples it has,
    when the input says (for the progress display)."""
    streams = ctx.input_streams(input_fn)
    windows = WindowedBatches(ctx.replica.device_batches(streams.host_batches()), ctx.plan,
                              ctx.replica)
    examples = streams.examples()
    if examples is not None and steps is not None:
        examples = min(examples, steps * ctx.global_batch_size)
    program.context.total_examples = examples
    return windows


def _gathered(ctx: ModeContext, outputs: list[Any],
              batches: list[HostBatch]) -> tuple[Any, list[int]]:
    """One window's per-step device outputs as host tensors of real rows, in input order, and
    each step's count of real rows over every replica (one gather brings both)."""
    host_outputs = ctx.replica.to_host(outputs)
    gathered = ctx.replica.host_gather((host_outputs, [batch.num_real for batch in batches]))
    reals = [replica[1] for replica in gathered]
    return (real_examples([replica[0] for replica in gathered], reals),
            [sum(step_reals) for step_reals in zip(*reals, strict=True)])


def _merge_metrics(total: dict[str, Metric] | None, new: Any) -> dict[str, Metric]:
    if not isinstance(new, dict):
        raise TypeError(f"metric_fn must return a dict of name -> Metric, got {type(new).__name__}")
    for name, value in new.items():
        if name == "global_step":
            raise ValueError("metric_fn returned a metric named 'global_step'; that name is reserved")
        if not isinstance(value, Metric):
            raise TypeError(
                f"metric_fn's {name!r} is a {type(value).__name__}, not a Metric: return metrics "
                "from torch_tpu_estimator.metrics (or a Metric subclass) so they accumulate exactly"
            )
    if total is None:
        return dict(new)
    return {name: total[name].merge(value) for name, value in new.items()}


class InferenceProgram(ModeProgram):
    """What evaluate and predict share: restored weights, fixed params, replayable steps."""

    def __init__(self, ctx: ModeContext, state: RunState):
        super().__init__(ctx, state.global_step)
        self.state = state
        self.params = ctx.model_params()

    def group_runner(self, run_step: StepRunner) -> Callable[[list[HostBatch]], list[Any]]:
        """Traced groups, or replayed ones where TPUConfig.replay_inference asks for it."""
        if not self.ctx.plan.replay:
            if self.ctx.config.tpu_config.replay_inference:
                logger.info("replay_inference has no effect on %s: every step is traced",
                            type(self.ctx.replica).__name__)
            return super().group_runner(run_step)
        from ..step.replay import ReplayedGroups

        return ReplayedGroups(self.trace_group, run_step, self.state.model)


class EvalProgram(InferenceProgram):
    """Evaluation in the loop: per-example losses and metric tensors, merged window by window."""

    def __init__(self, ctx: ModeContext, state: RunState, steps: int | None):
        super().__init__(ctx, state)
        self.steps = steps
        self.metric_fn = None
        self.metrics: dict[str, Metric] | None = None
        self.loss_sum, self.examples = 0.0, 0
        self.scalar_loss, self.warned = False, False

    def steps_left(self) -> float:
        return math.inf if self.steps is None else self.steps - self.steps_done

    def step(self, batch: HostBatch) -> tuple[torch.Tensor, Any]:
        with torch.no_grad():
            spec = self.ctx.call_model_fn(self.state.model, batch.features, batch.labels,
                                          self.params)
        self.note_spec_hooks(spec)
        self.metric_fn, tensors = spec.eval_metrics or (None, [])
        loss = spec.loss.detach()
        self.scalar_loss = loss.dim() == 0
        return (loss.expand(self.params["batch_size"]) if self.scalar_loss else loss), tensors

    def _warn_if_padding_averaged(self, batches: list[HostBatch]) -> None:
        """A scalar loss of a padded batch averages its padding copies in: said once, on the
        host (replayed steps do not run model_fn)."""
        rows = self.params["batch_size"]
        padded = [batch.num_real for batch in batches if batch.num_real < rows]
        if self.scalar_loss and padded and not self.warned:
            self.warned = True
            logger.warning(
                "model_fn's EVAL loss is a scalar and the last batch is padded (%d real of %d "
                "rows): the reported loss averages the padding copies in. Return the loss per "
                "example (reduction=\"none\") for an exact mean", padded[0], rows)

    def window_end(self, outputs: list[Any], batches: list[HostBatch],
                   seconds: float) -> tuple[Window, None]:
        self._warn_if_padding_averaged(batches)
        window, _ = _gathered(self.ctx, outputs, batches)
        if window is None:  # every row of the window was padding
            losses = np.zeros(0)
        else:
            losses_tensor, tensors = window
            self.loss_sum += float(losses_tensor.double().sum())
            self.examples += losses_tensor.numel()
            if self.metric_fn is not None:
                self.metrics = _merge_metrics(self.metrics,
                                              call_with_tensors(self.metric_fn, tensors))
            losses = losses_tensor.numpy()
        step = self.context.global_step
        return Window(step, step, losses, seconds, losses.size), None

    def results(self) -> dict[str, float]:
        if self.examples == 0:
            raise ValueError("eval input_fn produced no examples")
        results = {name: value.result() for name, value in (self.metrics or {}).items()}
        results.setdefault("loss", self.loss_sum / self.examples)
        results["global_step"] = self.context.global_step
        return results


def evaluate_replica(job: Job, replica: Replica, input_fn: InputFn, steps: int | None,
                     hooks: Sequence[Hook], checkpoint_path: str, name: str | None) -> dict:
    """Evaluates a checkpoint over the whole input (or `steps` batches); returns the metrics."""
    ctx = ModeContext(job, replica, ModeKeys.EVAL)
    directory = eval_dir(job.model_dir, name)
    unwritable = write_error(directory) if ctx.is_chief else None
    if unwritable is not None:  # a reader with read-only access still gets the results
        logger.warning("evaluate cannot write its results to %s (%s): it returns them "
                       "without writing them", directory, unwritable.strerror or unwritable)
    program = EvalProgram(ctx, _restored(ctx, checkpoint_path), steps)
    windows = _windows(ctx, input_fn, program, steps)
    run_to_end(program, windows, [*progress_hooks(ctx.config.progress), *hooks])
    results = program.results()
    global_step = program.context.global_step
    if ctx.is_chief and unwritable is None:
        write_scalars(directory, {key: value for key, value in results.items()
                                  if key != "global_step"}, global_step)
        write_hparams(directory, job.params, results)
    logger.info("Saving dict for global step %d: %s", global_step,
                ", ".join(f"{key} = {value:.6g}" for key, value in sorted(results.items())))
    return results


def _select(predictions: Any, predict_keys: Sequence[str] | None) -> Any:
    if predict_keys is None:
        return predictions
    if not isinstance(predictions, dict):
        raise ValueError("predict_keys needs model_fn's predictions to be a dict")
    missing = [key for key in predict_keys if key not in predictions]
    if missing:
        raise ValueError(f"predict_keys {missing} are not in the predictions {sorted(predictions)}")
    return {key: predictions[key] for key in predict_keys}


def _split_examples(batch: Any) -> Iterator[Any]:
    if isinstance(batch, dict):
        rows = next(iter(batch.values())).shape[0]
        for row in range(rows):
            yield {key: value[row] for key, value in batch.items()}
    else:
        yield from batch


def _batches_of(window: Any, sizes: list[int]) -> Iterator[Any]:
    start = 0
    for size in sizes:
        if not size:
            continue
        if isinstance(window, dict):
            yield {key: value[start:start + size] for key, value in window.items()}
        else:
            yield window[start:start + size]
        start += size


class PredictProgram(InferenceProgram):
    """Prediction in the loop: each window's predictions, in input order, padding removed."""

    def __init__(self, ctx: ModeContext, state: RunState, predict_keys: Sequence[str] | None,
                 yield_single_examples: bool):
        super().__init__(ctx, state)
        self.predict_keys = predict_keys
        self.yield_single_examples = yield_single_examples

    def step(self, batch: HostBatch) -> Any:
        with torch.no_grad():
            spec = self.ctx.call_model_fn(self.state.model, batch.features, batch.labels,
                                          self.params)
        self.note_spec_hooks(spec)
        return _select(spec.predictions, self.predict_keys)

    def window_end(self, outputs: list[Any], batches: list[HostBatch],
                   seconds: float) -> tuple[Window, list[Any]]:
        window, reals = _gathered(self.ctx, outputs, batches)
        step = self.context.global_step
        hook_window = Window(step, step, np.zeros(0), seconds, sum(reals))
        if window is None:
            return hook_window, []
        if self.yield_single_examples:
            return hook_window, list(_split_examples(window))
        return hook_window, list(_batches_of(window, reals))


def predict_replica(job: Job, replica: Replica, input_fn: InputFn,
                    predict_keys: Sequence[str] | None, hooks: Sequence[Hook],
                    checkpoint_path: str, yield_single_examples: bool) -> Iterator[Any]:
    """Yields predictions in input order, padding removed, per example or per batch."""
    ctx = ModeContext(job, replica, ModeKeys.PREDICT)
    program = PredictProgram(ctx, _restored(ctx, checkpoint_path), predict_keys,
                             yield_single_examples)
    windows = _windows(ctx, input_fn, program)
    hooks = [*progress_hooks(ctx.config.progress), *hooks]
    with contextlib.closing(run_loop(program, windows, hooks)) as results:
        for items in results:
            yield from items
