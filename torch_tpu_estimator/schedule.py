"""train_and_evaluate: train N steps, evaluate, repeat.

With hooks that keep the best checkpoint and stop early on an eval metric (the Hook phase
`after_evaluation`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence

from .api.checks import require_positive_int
from .api.hooks import Hook, RunContext, require_hooks
from .api.job import InputFn
from .api.spec import ModeKeys
from .estimator import TPUEstimator
from .state.stores import store_for

logger = logging.getLogger("torch_tpu_estimator")


def _improves(value: float, best: float | None, higher_is_better: bool, min_delta: float) -> bool:
    if best is None:
        return not math.isnan(value)
    return value > best + min_delta if higher_is_better else value < best - min_delta


class KeepBestCheckpoint(Hook):
    """Copies the checkpoint with the best `metric` so far into `directory`.

    With `best.json` naming it and its eval results (so keep_checkpoint_max never deletes the
    best one).

    Args:
        directory: where the best checkpoint goes: a local folder or an fsspec URL.
        metric: the eval result compared.
        higher_is_better: True when a larger `metric` is better (accuracy), False when a
            smaller one is (loss).
    """

    def __init__(self, directory: str, metric: str = "loss", higher_is_better: bool = False):
        self.directory, self.metric, self.higher_is_better = directory, metric, higher_is_better
        self.best: float | None = None

    def after_evaluation(self, context: RunContext, results: dict[str, float],
                         checkpoint_path: str) -> None:
        """Copies the evaluated checkpoint when `metric` is the best so far."""
        if self.metric not in results:
            raise ValueError(f"KeepBestCheckpoint metric {self.metric!r} is not among the eval "
                             f"results {sorted(results)}")
        if not _improves(results[self.metric], self.best, self.higher_is_better, 0.0):
            return
        self.best = results[self.metric]
        if not context.is_chief:  # under torchrun every rank evaluates; rank 0 writes
            return
        store = store_for(self.directory)  # each of the two may be a bucket
        store.makedirs(self.directory)
        name = store_for(checkpoint_path).basename(checkpoint_path)
        target = store.join(self.directory, name)
        store.copy_in(store_for(checkpoint_path).local_copy(checkpoint_path), target)
        record = json.dumps({"checkpoint": name, "results": results})
        store.publish(store.join(self.directory, "best.json"), record.encode())
        logger.info("New best %s = %.6g: kept %s", self.metric, self.best, target)


class EarlyStopping(Hook):
    """Stops train_and_evaluate once `metric` has not improved for `patience` evaluations.

    An improvement is a change of at least `min_delta`, in the better direction.

    Args:
        metric: the eval result watched.
        higher_is_better: True when a larger `metric` is better, False when a smaller one is.
        patience: evaluations in a row without improvement that stop the run (>= 1).
        min_delta: the least change that counts as an improvement.
    """

    def __init__(self, metric: str = "loss", higher_is_better: bool = False, patience: int = 3,
                 min_delta: float = 0.0):
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.metric, self.higher_is_better = metric, higher_is_better
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.stale = 0

    def after_evaluation(self, context: RunContext, results: dict[str, float],
                         checkpoint_path: str) -> None:
        """Counts evaluations without improvement; requests the stop at `patience`."""
        if _improves(results[self.metric], self.best, self.higher_is_better, self.min_delta):
            self.best, self.stale = results[self.metric], 0
            return
        self.stale += 1
        if self.stale >= self.patience:
            logger.info("Early stopping: %s did not improve for %d evaluations", self.metric,
                        self.stale)
            context.request_stop()


def train_and_evaluate(
    estimator: TPUEstimator,
    train_input_fn: InputFn,
    eval_input_fn: InputFn,
    max_steps: int,
    steps_between_evals: int,
    eval_steps: int | None = None,
    eval_name: str | None = None,
    eval_hooks: Sequence[Hook] = (),
) -> list[dict[str, float]]:
    """Alternates `steps_between_evals` training steps and one evaluation.

    Until `max_steps`, or until an eval hook requests a stop in `after_evaluation`.

    Args:
        estimator: the TPUEstimator to train and evaluate.
        train_input_fn: the training input_fn.
        eval_input_fn: the evaluation input_fn.
        max_steps: the global step at which training ends.
        steps_between_evals: training steps between two evaluations.
        eval_steps: steps per evaluation (None: the whole evaluation input).
        eval_name: the evaluation's name (events in `eval_<name>`).
        eval_hooks: hooks of every evaluation; their `after_evaluation` sees the results and
            may request a stop (EarlyStopping, KeepBestCheckpoint).

    Returns:
        Every evaluation's results, in order.
    """
    require_positive_int("max_steps", max_steps, optional=False)
    require_positive_int("steps_between_evals", steps_between_evals, optional=False)
    eval_hooks = require_hooks("eval_hooks", eval_hooks)
    history: list[dict[str, float]] = []
    evaluated = estimator.latest_checkpoint()
    step = int(estimator.get_variable_value("global_step")) if evaluated else 0
    while step < max_steps:
        estimator.train(train_input_fn, max_steps=min(step + steps_between_evals, max_steps))
        if estimator.latest_checkpoint() == evaluated:
            logger.info("train_and_evaluate: training made no progress past global step %d (its "
                        "input ended): stopping", step)
            break
        results = estimator.evaluate(eval_input_fn, steps=eval_steps, name=eval_name)
        history.append(results)
        step = int(results["global_step"])
        context = RunContext(ModeKeys.EVAL, step, estimator.caller_is_chief, estimator.model_dir)
        evaluated = estimator.latest_checkpoint()
        for hook in eval_hooks:
            hook.after_evaluation(context, results, evaluated)
        if context.stop_requested:
            break
    return history
