"""TPUEstimator: the user-facing facade. It validates, picks the runtime, and hands work to loops.

No device code lives here: every argument is checked before any replica starts, so a bad call
fails fast and leaves model_dir as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .api.binding import INPUT_FN_ARGUMENTS, MODEL_FN_ARGUMENTS, bind
from .api.checks import (
    checked_assets_extra,
    checked_batch_sizes,
    checked_export_arguments,
    checked_params,
    require_batch_sizes,
    require_callable,
    require_positive_int_if_given,
    resolved_model_dir,
)
from .api.config import RunConfig
from .api.hooks import Hook, require_hooks
from .api.job import InputFn, Job, ModelInitFn, OptimizerFn
from .api.spec import ModeKeys
from .api.warm_start_settings import WarmStartSettings
from .common.logs import keeping_root_logging
from .export.signature import DEFAULT_SERVING_BATCH_SIZES, named_rows
from .modes.inference import evaluate_replica, predict_replica
from .modes.train import train_replica
from .observability import summary
from .runtime import Launcher, Topology, resolve_launcher
from .runtime.torch_dist import TorchLauncher, cpu_replica
from .state import checkpoint
from .state.schema import Checkpoint
from .step import preemption

logger = logging.getLogger("torch_tpu_estimator")

_MODE_NAMES = {ModeKeys.TRAIN: "train", ModeKeys.EVAL: "eval", ModeKeys.PREDICT: "predict"}


class TPUEstimator:
    """Trains, evaluates, predicts with and exports a model_fn, on XLA devices or plain PyTorch.

    Batch sizes are global: `params["batch_size"]` holds the batch model_fn traces (the
    per-replica batch with one process per replica; the global batch on an SPMD mesh; one
    micro-batch with gradient accumulation) and the per-input-pipeline batch in input_fn.

    Args:
        model_fn: one step of the model: called with any of `features`, `labels`, `mode`,
            `params`, `config`, `model` (the module) and `update` (the update step), bound by
            name; returns a TPUEstimatorSpec.
        model_dir: where checkpoints, event files and run.json go: a local folder or an fsspec
            URL (`gs://...`). Defaults to RunConfig.model_dir, else a new temporary folder.
        config: the RunConfig (RunConfig() when None).
        params: handed to model_fn and input_fn, with `batch_size` and `context` added.
        use_tpu: True runs on XLA devices (TPU; XLA:CPU here); False on plain PyTorch.
        train_batch_size: the global training batch; the replica count must divide it.
        eval_batch_size: the global evaluation batch.
        predict_batch_size: the global prediction batch.
        batch_axis: accepted for TF code: 0 only (tensors split along their first dimension).
        eval_on_tpu: False evaluates on plain PyTorch on the host.
        warm_start_from: a checkpoint, a model_dir or WarmStartSettings whose weights start a
            new run (an empty model_dir).
        export_to_tpu: accepted for ported code, no effect: an export is XLA HLO, which serves
            on any XLA device, TPU included.
        model_init_fn: model_init_fn(params) builds the torch.nn.Module, once per replica.
        optimizer_fn: optimizer_fn(model, params) returns an optimizer, (optimizer,
            lr_scheduler), or a dict of name -> either. Needed to train.
    """

    def __init__(
        self,
        model_fn: Callable[..., Any] | None = None,
        model_dir: str | None = None,
        config: RunConfig | None = None,
        params: dict | None = None,
        use_tpu: bool = True,
        train_batch_size: int | None = None,
        eval_batch_size: int | None = None,
        predict_batch_size: int | None = None,
        batch_axis: Sequence[int] | None = None,
        eval_on_tpu: bool = True,
        warm_start_from: str | WarmStartSettings | None = None,
        export_to_tpu: bool = True,
        *,
        model_init_fn: ModelInitFn | None = None,
        optimizer_fn: OptimizerFn | None = None,
    ):
        require_callable("model_fn", model_fn)
        require_callable("model_init_fn", model_init_fn)
        require_callable("optimizer_fn", optimizer_fn, required=False)
        model_fn_binding = bind(model_fn, "model_fn", MODEL_FN_ARGUMENTS)
        config = RunConfig() if config is None else config
        if not isinstance(config, RunConfig):
            raise TypeError(f"config must be a RunConfig, got {type(config).__name__}")
        params = checked_params(params)
        if not all(isinstance(flag, bool) for flag in (use_tpu, eval_on_tpu, export_to_tpu)):
            raise TypeError("use_tpu, eval_on_tpu and export_to_tpu must be bools")
        if batch_axis is not None and any(axis != 0 for axis in batch_axis):
            raise ValueError(
                f"batch_axis={tuple(batch_axis)} is not supported: every input tensor is split "
                "along its first dimension"
            )
        warm_start_from = WarmStartSettings.of(warm_start_from)
        self._launcher: Launcher = resolve_launcher(use_tpu, config.tpu_config)
        self._eval_launcher = self._launcher if eval_on_tpu else TorchLauncher(
            timeout_secs=config.tpu_config.replica_timeout_secs)
        topology = self._launcher.topology
        config.tpu_config.require_input_fits(topology.num_replicas, topology.one_program)
        batch_sizes = {ModeKeys.TRAIN: train_batch_size, ModeKeys.EVAL: eval_batch_size,
                       ModeKeys.PREDICT: predict_batch_size}
        require_batch_sizes({f"{_MODE_NAMES[mode]}_batch_size": (size, (
            self._eval_launcher if mode == ModeKeys.EVAL else self._launcher
        ).topology.num_replicas) for mode, size in batch_sizes.items()},
            config.update_config.accumulation_steps)
        self._model_dir = resolved_model_dir(model_dir, config.model_dir)
        self._config = config.replace(model_dir=self._model_dir)
        self._job = Job(model_fn=model_fn_binding, model_init_fn=model_init_fn,
                        optimizer_fn=optimizer_fn, params=params, config=self._config,
                        model_dir=self._model_dir, batch_sizes=batch_sizes,
                        warm_start_from=warm_start_from)
        self._model_fn = model_fn

    @property
    def config(self) -> RunConfig:
        """The RunConfig, with the resolved model_dir."""
        return self._config

    @property
    def model_dir(self) -> str:
        """The model_dir: a local folder or a URL."""
        return self._model_dir

    @property
    def params(self) -> dict:
        """A copy of the params given to the constructor."""
        return dict(self._job.params)

    @property
    def model_fn(self) -> Callable[..., Any]:
        """The model_fn given to the constructor."""
        return self._model_fn

    @property
    def topology(self) -> Topology:
        """The replicas train and predict run on, as known before any starts."""
        return self._launcher.topology

    @property
    def caller_is_chief(self) -> bool:
        """Whether this process speaks for the job (False on torchrun ranks other than 0)."""
        return self._launcher.caller_is_chief

    def _require_batch_size(self, mode: str) -> None:
        if self._job.batch_sizes[mode] is None:
            raise ValueError(f"{_MODE_NAMES[mode]}_batch_size must be set in the constructor to "
                             f"{_MODE_NAMES[mode]}")

    def train(
        self,
        input_fn: InputFn,
        hooks: Sequence[Hook] | None = None,
        steps: int | None = None,
        max_steps: int | None = None,
        saving_listeners: Sequence[Hook] | None = None,
    ) -> TPUEstimator:
        """Trains: `steps` more steps, or up to global step `max_steps`, or until input ends.

        SIGTERM (preemption) ends training at the next step boundary with a checkpoint, then
        raises SystemExit(143); the same call, run again, continues from there (preemption.py).
        """
        require_callable("input_fn", input_fn)
        bind(input_fn, "input_fn", INPUT_FN_ARGUMENTS, params_alone=True)
        if steps is not None and max_steps is not None:
            raise ValueError("Can not provide both steps and max_steps")
        require_positive_int_if_given("steps", steps)
        require_positive_int_if_given("max_steps", max_steps)
        self._require_batch_size(ModeKeys.TRAIN)
        if self._job.optimizer_fn is None:
            raise ValueError("optimizer_fn must be given in the constructor to train")
        hooks = [*require_hooks("hooks", hooks),
                 *require_hooks("saving_listeners", saving_listeners)]
        job = self._job
        preempted = self._launcher.run(
            lambda replica: train_replica(job, replica, input_fn, hooks, steps, max_steps), hooks)
        if preempted:
            raise SystemExit(preemption.EXIT_STATUS)
        return self

    def _checkpoint_to_use(self, checkpoint_path: str | None) -> str:
        if checkpoint_path is not None:
            return checkpoint.resolve_checkpoint_path(checkpoint_path)
        latest = self.latest_checkpoint()
        if latest is None:
            raise ValueError(
                f"Could not find a trained model in model_dir {self._model_dir!r}: train first "
                "or give checkpoint_path"
            )
        return latest

    def _check_inference(self, mode: str, input_fn: InputFn, hooks: Sequence[Hook] | None
                         ) -> list[Hook]:
        require_callable("input_fn", input_fn)
        bind(input_fn, "input_fn", INPUT_FN_ARGUMENTS, params_alone=True)
        self._require_batch_size(mode)
        return require_hooks("hooks", hooks)

    def evaluate(
        self,
        input_fn: InputFn,
        steps: int | None = None,
        hooks: Sequence[Hook] | None = None,
        checkpoint_path: str | None = None,
        name: str | None = None,
    ) -> dict[str, float]:
        """Evaluates the latest (or given) checkpoint over the whole input, or `steps` batches.

        Returns the metrics of eval_metrics, `loss` (the mean over real examples) and
        `global_step`, and writes them to `eval_dir(name)`.
        """
        hooks = self._check_inference(ModeKeys.EVAL, input_fn, hooks)
        require_positive_int_if_given("steps", steps)
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        path = self._checkpoint_to_use(checkpoint_path)
        job = self._job
        return self._eval_launcher.run(
            lambda replica: evaluate_replica(job, replica, input_fn, steps, hooks, path, name),
            hooks)

    def predict(
        self,
        input_fn: InputFn,
        predict_keys: Sequence[str] | None = None,
        hooks: Sequence[Hook] | None = None,
        checkpoint_path: str | None = None,
        yield_single_examples: bool = True,
    ) -> Iterator[Any]:
        """Yields predictions in input order, padding removed: one per example, or per batch.

        Each item is a dict of CPU tensors (or a tensor when model_fn's predictions is one).
        """
        hooks = self._check_inference(ModeKeys.PREDICT, input_fn, hooks)
        if predict_keys is not None and (isinstance(predict_keys, str) or not all(
                isinstance(key, str) for key in predict_keys)):
            raise TypeError("predict_keys must be a list of str")
        path = self._checkpoint_to_use(checkpoint_path)
        job = self._job
        return self._launcher.stream(lambda replica: predict_replica(
            job, replica, input_fn, predict_keys, hooks, path, yield_single_examples))

    def export_saved_model(
        self,
        export_dir_base: str,
        serving_input_receiver_fn_or_example_features: Any,
        assets_extra: Mapping[str, str] | None = None,
        checkpoint_path: str | None = None,
        batch_sizes: Sequence[int] = DEFAULT_SERVING_BATCH_SIZES,
        as_tf_saved_model: bool = False,
        as_text: bool = False,
        weights_dtype: torch.dtype | None = None,
    ) -> str:
        """Exports the latest (or given) checkpoint for serving; returns the new directory.

        The second argument is example features (a tensor or dict of tensors, batch first: their
        dtypes and per-example shapes become the signature) or a function of no arguments that
        returns them. model_fn is traced in PREDICT mode once per batch size in `batch_sizes`;
        its `export_outputs`, else its `predictions`, are the outputs. `assets_extra` maps a
        path inside `assets.extra/` to the file copied there. The layout is in export.py;
        `load_exported` serves it. Under torchrun the chief exports and every rank gets the path.
        TF's `as_text` is accepted and changes nothing: every function is written as text (.mlir)
        beside its bytecode anyway. `weights_dtype` casts the floating weights for serving
        (float32, float16 or float64; bfloat16 weights become float32 by default, as the exporter cannot
        store bfloat16); model_fn must accept weights of that dtype.
        """
        export_dir_base = checked_export_arguments(export_dir_base, as_tf_saved_model, as_text,
                                                   weights_dtype)
        sizes = checked_batch_sizes(batch_sizes)
        assets = checked_assets_extra(assets_extra)
        with keeping_root_logging():  # torch_xla's import configures the root logger
            from .modes.export import ExportRequest, export_replica
        from .export.tf_export import import_tensorflow
        if as_tf_saved_model:
            import_tensorflow()
        features = serving_input_receiver_fn_or_example_features
        inputs, features_is_dict = named_rows(features() if callable(features) else features,
                                              "example features")
        if next(iter(inputs.values())).shape[0] == 0:
            raise ValueError("example features have no rows: give at least one example")
        request = ExportRequest(inputs, features_is_dict, sizes, export_dir_base,
                                self._checkpoint_to_use(checkpoint_path), assets,
                                as_tf_saved_model, weights_dtype)
        job = self._job
        return self._launcher.run_on_chief(lambda: export_replica(job, cpu_replica(), request))

    def export_savedmodel(self, export_dir_base: str,
                          serving_input_receiver_fn_or_example_features: Any,
                          assets_extra: Mapping[str, str] | None = None, as_text: bool = False,
                          checkpoint_path: str | None = None, strip_default_attrs: bool = False,
                          **kwargs: Any) -> str:
        """TF 1's name for export_saved_model (`strip_default_attrs` concerns TF graphs only)."""
        return self.export_saved_model(export_dir_base,
                                       serving_input_receiver_fn_or_example_features,
                                       assets_extra=assets_extra, as_text=as_text,
                                       checkpoint_path=checkpoint_path, **kwargs)

    def latest_checkpoint(self) -> str | None:
        """Path of the newest intact checkpoint in model_dir (a damaged one is skipped), or None."""
        return checkpoint.latest_checkpoint(self._model_dir)

    def _latest(self) -> Checkpoint:
        path = self.latest_checkpoint()
        if path is None:
            raise ValueError(f"model_dir {self._model_dir!r} holds no checkpoint yet")
        return Checkpoint.load(path)

    def get_variable_names(self) -> list[str]:
        """Names of the model's tensors in the latest checkpoint, and `global_step`."""
        return sorted([*self._latest().tensor_specs("model"), "global_step"])

    def get_variable_value(self, name: str | Sequence[str]) -> np.ndarray | list[np.ndarray]:
        """Value of one tensor of the latest checkpoint as a NumPy array (a list, for a list)."""
        saved = self._latest()
        weights = saved.part("model")
        names = [name] if isinstance(name, str) else list(name)
        values = []
        for one in names:
            if one == "global_step":
                values.append(np.asarray(saved.global_step))
            elif one in weights:
                values.append(weights[one].numpy())
            else:
                raise ValueError(f"no variable {one!r} in {saved.path}")
        return values[0] if isinstance(name, str) else values

    def eval_dir(self, name: str | None = None) -> str:
        """Where evaluation `name` writes its summaries."""
        return summary.eval_dir(self._model_dir, name)
