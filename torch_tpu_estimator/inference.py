"""The eval and predict loops: fixed-shape padded batches, one transfer per window, exact results.

Each step's outputs stay on the device until its window ends; they then come to the host in one
transfer, are gathered from every replica, stripped of padding (input.py pads the last batch and
counts its real rows) and put back in input order by gather.real_examples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .gather import real_examples
from .hooks import Hook, RunContext, Window
from .job import InputFn, Job
from .loops import log_device_report, open_windows
from .metrics import Metric
from .runtime.base import Progress, Runtime
from .spec import ModeKeys, call_with_tensors, validate_spec
from .summary import eval_dir, write_scalars
from .training_state import TrainingState

logger = logging.getLogger("torch_tpu_estimator")


def _restored_model(job: Job, runtime: Runtime, mode: str, checkpoint_path: str
                    ) -> tuple[TrainingState, dict, int]:
    params = job.model_params(runtime, mode)
    state = TrainingState.build(runtime, job.model_init_fn, None, params, job.config.seed)
    global_step = state.restore(checkpoint_path, runtime, weights_only=True)
    state.model.eval()
    return state, params, global_step


def _gathered_window(runtime: Runtime, outputs: list[Any], num_reals: list[int]) -> Any:
    """One window's per-step device outputs as host tensors of real rows, in input order."""
    host_outputs = runtime.to_host(outputs)
    gathered = runtime.host_gather((host_outputs, num_reals))
    return real_examples([replica[0] for replica in gathered], [replica[1] for replica in gathered])


def _loss_rows(loss: torch.Tensor, batch_size: int) -> torch.Tensor:
    """A step's loss as one value per example: a scalar is repeated over the batch."""
    return loss.expand(batch_size) if loss.dim() == 0 else loss


def _eval_step(job: Job, state: TrainingState, batch: Any, params: dict) -> tuple[Any, Any]:
    """model_fn's EVAL spec for one batch, and its loss as one value per example."""
    spec = validate_spec(job.model_fn(state.model, batch.features, batch.labels, ModeKeys.EVAL,
                                      params), ModeKeys.EVAL)
    return spec, _loss_rows(spec.loss.detach(), params["batch_size"])


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


def evaluate_replica(job: Job, runtime: Runtime, input_fn: InputFn, steps: int | None,
                     hooks: Sequence[Hook], checkpoint_path: str, name: str | None) -> dict:
    """Evaluates a checkpoint over the whole input (or `steps` batches); returns the metrics."""
    counters = runtime.device_counters()
    state, params, global_step = _restored_model(job, runtime, ModeKeys.EVAL, checkpoint_path)
    run_step = runtime.step_runner(ModeKeys.EVAL, job.config.tpu_config.max_graphs(ModeKeys.EVAL))
    windows = open_windows(job, runtime, ModeKeys.EVAL, input_fn)
    context = RunContext(ModeKeys.EVAL, global_step, runtime.is_chief, job.model_dir)
    for hook in hooks:
        hook.begin(context)
    metric_fn, metrics, loss_sum, examples, done = None, None, 0.0, 0, 0
    warned = False
    try:
        while not windows.exhausted and (steps is None or done < steps):
            outputs, num_reals = [], []
            with torch.no_grad():
                for batch in windows.window(float("inf") if steps is None else steps - done):
                    runtime.heartbeat(Progress.MODEL_FN, done + len(outputs) + 1)
                    spec, losses = run_step(lambda batch=batch: _eval_step(job, state, batch,
                                                                           params))
                    metric_fn, tensors = spec.eval_metrics or (None, [])
                    outputs.append((losses, tensors))
                    num_reals.append(batch.num_real)
                    if not warned and spec.loss.dim() == 0 and \
                            batch.num_real < params["batch_size"]:
                        warned = True
                        logger.warning(
                            "model_fn's EVAL loss is a scalar and the last batch is padded (%d "
                            "real of %d rows): the reported loss averages the padding copies "
                            "in. Return the loss per example (reduction=\"none\") for an exact "
                            "mean", batch.num_real, params["batch_size"])
            runtime.heartbeat(Progress.HOST, done + len(outputs))
            done += len(outputs)
            window = _gathered_window(runtime, outputs, num_reals)
            if window is None:
                continue
            losses, tensors = window
            loss_sum += float(losses.double().sum())
            examples += losses.numel()
            if metric_fn is not None:
                metrics = _merge_metrics(metrics, call_with_tensors(metric_fn, tensors))
            for hook in hooks:
                hook.after_window(context, Window(global_step, global_step, losses.numpy(), [],
                                                  windows.seconds(), losses.numel()))
    finally:
        windows.batches.close()
    if examples == 0:
        raise ValueError("eval input_fn produced no examples")
    results = {name: value.result() for name, value in (metrics or {}).items()}
    results.setdefault("loss", loss_sum / examples)
    results["global_step"] = global_step
    if runtime.is_chief:
        write_scalars(eval_dir(job.model_dir, name), results, global_step)
    logger.info("Saving dict for global step %d: %s", global_step,
                ", ".join(f"{key} = {value:.6g}" for key, value in sorted(results.items())))
    for hook in hooks:
        hook.end(context)
    log_device_report(runtime, ModeKeys.EVAL, counters)
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


def predict_replica(job: Job, runtime: Runtime, input_fn: InputFn,
                    predict_keys: Sequence[str] | None, hooks: Sequence[Hook],
                    checkpoint_path: str, yield_single_examples: bool) -> Iterator[Any]:
    """Yields predictions in input order, padding removed, per example or per batch."""
    counters = runtime.device_counters()
    state, params, global_step = _restored_model(job, runtime, ModeKeys.PREDICT, checkpoint_path)
    run_step = runtime.step_runner(ModeKeys.PREDICT,
                                   job.config.tpu_config.max_graphs(ModeKeys.PREDICT))
    windows = open_windows(job, runtime, ModeKeys.PREDICT, input_fn)
    context = RunContext(ModeKeys.PREDICT, global_step, runtime.is_chief, job.model_dir)
    for hook in hooks:
        hook.begin(context)
    try:
        while not windows.exhausted:
            outputs, num_reals = [], []
            with torch.no_grad():
                for batch in windows.window():
                    runtime.heartbeat(Progress.MODEL_FN, len(num_reals) + 1)
                    spec = run_step(lambda batch=batch: validate_spec(
                        job.model_fn(state.model, batch.features, batch.labels,
                                     ModeKeys.PREDICT, params), ModeKeys.PREDICT))
                    outputs.append(_select(spec.predictions, predict_keys))
                    num_reals.append(batch.num_real)
            runtime.heartbeat(Progress.HOST, len(num_reals))
            window = _gathered_window(runtime, outputs, num_reals)
            if window is None:
                continue
            if yield_single_examples:
                yield from _split_examples(window)
            else:
                yield from _batches_of(window, _global_reals(runtime, num_reals))
    finally:
        windows.batches.close()
    for hook in hooks:
        hook.end(context)
    log_device_report(runtime, ModeKeys.PREDICT, counters)


def _global_reals(runtime: Runtime, num_reals: list[int]) -> list[int]:
    per_replica = runtime.host_gather(num_reals)
    return [sum(step) for step in zip(*per_replica, strict=True)]


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

