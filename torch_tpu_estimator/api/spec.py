"""What model_fn returns, per mode, and the checks that tell the user what is missing."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class ModeKeys:
    """The three modes model_fn is called in, spelled as in tf.estimator."""

    TRAIN = "train"
    EVAL = "eval"
    PREDICT = "infer"
    ALL = (TRAIN, EVAL, PREDICT)


FnAndTensors = tuple  # (callable, list or dict of tensors)


@dataclasses.dataclass
class TPUEstimatorSpec:
    """model_fn's answer on any runtime.

    TF's `train_op` and `scaffold_fn` have no equivalent: giving one is a TypeError that says
    what to do instead.

    Attributes:
        mode: the ModeKeys value model_fn was called with.
        loss: a scalar tensor (TRAIN and EVAL). In EVAL it may also be one value per example
            (a `reduction="none"` loss), which makes the reported loss exact on a padded last
            batch; a scalar loss is weighted by the batch's number of real examples.
        predictions: a tensor or a dict of tensors whose first axis is the batch (PREDICT).
        eval_metrics: (metric_fn, tensors): metric_fn runs on the host over the tensors
            gathered from every replica, and returns {name: Metric}.
        host_call: (fn, tensors): fn runs on the host at window ends in TRAIN, for custom
            summaries (TPUConfig.experimental_host_call_every_n_steps).
        export_outputs: a dict of the tensors an export serves; defaults to `predictions`.
        training_hooks: Hooks added to this train() call.
        evaluation_hooks: Hooks added to this evaluate() call.
        prediction_hooks: Hooks added to this predict() call.
    """

    mode: str
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    eval_metrics: FnAndTensors | None = None
    host_call: FnAndTensors | None = None
    export_outputs: Mapping[str, torch.Tensor] | None = None
    training_hooks: Sequence[Any] = ()
    evaluation_hooks: Sequence[Any] = ()
    prediction_hooks: Sequence[Any] = ()
    train_op: dataclasses.InitVar[Any] = None
    scaffold_fn: dataclasses.InitVar[Any] = None

    def __post_init__(self, train_op: Any, scaffold_fn: Any) -> None:
        _refuse_tf_only(type(self).__name__, train_op, scaffold_fn)


@dataclasses.dataclass
class EstimatorSpec:
    """TF's Estimator answer, accepted in every mode and on every runtime like TPUEstimatorSpec.

    Ported code returns it where TF ran on the CPU, e.g. EVAL with `eval_on_tpu=False`.

    TF's EstimatorSpec has no host_call, so it is always None here (the loops read it from
    either spec).

    Attributes:
        mode: the ModeKeys value model_fn was called with.
        loss: a scalar tensor (TRAIN and EVAL). In EVAL it may also be one value per example
            (a `reduction="none"` loss), which makes the reported loss exact on a padded last
            batch; a scalar loss is weighted by the batch's number of real examples.
        predictions: a tensor or a dict of tensors whose first axis is the batch (PREDICT).
        eval_metrics: (metric_fn, tensors): metric_fn runs on the host over the tensors
            gathered from every replica, and returns {name: Metric}.
        export_outputs: a dict of the tensors an export serves; defaults to `predictions`.
        training_hooks: Hooks added to this train() call.
        evaluation_hooks: Hooks added to this evaluate() call.
        prediction_hooks: Hooks added to this predict() call.
    """

    mode: str
    loss: torch.Tensor | None = None
    predictions: torch.Tensor | Mapping[str, torch.Tensor] | None = None
    eval_metrics: FnAndTensors | None = None
    export_outputs: Mapping[str, torch.Tensor] | None = None
    training_hooks: Sequence[Any] = ()
    evaluation_hooks: Sequence[Any] = ()
    prediction_hooks: Sequence[Any] = ()
    host_call: None = dataclasses.field(default=None, init=False)
    train_op: dataclasses.InitVar[Any] = None
    scaffold: dataclasses.InitVar[Any] = None

    def __post_init__(self, train_op: Any, scaffold: Any) -> None:
        _refuse_tf_only(type(self).__name__, train_op, scaffold)


def _refuse_tf_only(spec: str, train_op: Any, scaffold: Any) -> None:
    """TF's graph-only spec fields, refused with what replaces them here."""
    if train_op is not None:
        raise TypeError(
            f"{spec} takes no train_op: in PyTorch the update is not an op of a graph. Return "
            "the loss and the estimator runs the update with optimizer_fn's optimizer, or let "
            "model_fn run it: take an argument named `update` and call update.step(loss, name) "
            "or, for TF's tf.group of several minimize ops, update.minimize({name: loss, ...}) "
            "(docs: guides/update-step)")
    if scaffold is not None:
        raise TypeError(
            f"{spec} takes no scaffold: build the module in model_init_fn, and initialize it "
            "from a checkpoint with TPUEstimator(warm_start_from=...)")


def _check_fn_and_tensors(name: str, value: Any) -> None:
    if not (isinstance(value, (tuple, list)) and len(value) == 2 and callable(value[0])):
        raise ValueError(f"{name} must be a (fn, tensors) pair, got {type(value).__name__}")
    if not isinstance(value[1], (list, tuple, dict)):
        raise ValueError(
            f"{name}[1] must be a list or dict of tensors, got {type(value[1]).__name__}"
        )


def validate_spec(spec: Any, mode: str, manual_update: bool = False
                  ) -> TPUEstimatorSpec | EstimatorSpec:
    """Checks model_fn's return value for `mode` and says exactly what is wrong.

    With `manual_update` (model_fn ran the update itself) the TRAIN loss is only reported.
    """
    if not isinstance(spec, (TPUEstimatorSpec, EstimatorSpec)):
        raise TypeError(
            f"model_fn must return a TPUEstimatorSpec or EstimatorSpec in mode {mode!r}, "
            f"got {type(spec).__name__}"
        )
    if spec.mode != mode:
        raise ValueError(f"model_fn was called in mode {mode!r} but returned a spec for {spec.mode!r}")
    if mode in (ModeKeys.TRAIN, ModeKeys.EVAL):
        loss = spec.loss
        if not isinstance(loss, torch.Tensor):
            raise ValueError(
                f"model_fn must return a spec with a scalar tensor `loss` in mode {mode!r}, "
                f"got {type(loss).__name__}"
            )
        per_example_ok = mode == ModeKeys.EVAL and loss.dim() == 1
        if loss.dim() != 0 and not per_example_ok:
            raise ValueError(
                f"model_fn's loss must be a scalar tensor in mode {mode!r}"
                + (" (or one value per example)" if mode == ModeKeys.EVAL else "")
                + f", got shape {tuple(loss.shape)}"
            )
        if mode == ModeKeys.TRAIN and not manual_update and not loss.requires_grad:
            raise ValueError(
                "model_fn's loss in mode 'train' does not require grad: it is not connected to "
                "any trainable parameter"
            )
    if mode == ModeKeys.PREDICT and spec.predictions is None:
        raise ValueError("model_fn must return a spec with `predictions` in mode 'infer'")
    if spec.eval_metrics is not None:
        _check_fn_and_tensors("eval_metrics", spec.eval_metrics)
    if spec.host_call is not None:
        _check_fn_and_tensors("host_call", spec.host_call)
    return spec



def call_with_tensors(fn: Callable[..., Any], tensors: Any, **extra: Any) -> Any:
    """Calls the fn of an (fn, tensors) pair: a dict as keyword arguments, a list as positional."""
    if isinstance(tensors, dict):
        return fn(**tensors, **extra)
    return fn(*tensors, **extra)
