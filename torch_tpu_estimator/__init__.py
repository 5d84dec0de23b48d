"""TensorFlow's TPUEstimator pattern for PyTorch/XLA: write model_fn and input_fn, then train.

The public names load on first use (PEP 562), so that importing the package, and
`python -m torch_tpu_estimator --help`, start neither torch nor torch_xla; torch_xla is
imported only by the runs that use it.
"""

from __future__ import annotations

import importlib
from typing import Any

from .common.version import __version__ as __version__

_EXPORTS = {
    "CheckpointSaverListener": "api.hooks",
    "CheckpointUploadError": "state.uploads",
    "DatasetConfig": "api.config",
    "EarlyStopping": "schedule",
    "EstimatorSpec": "api.spec",
    "ExportedModel": "export.serving",
    "Hook": "api.hooks",
    "InputPipelineConfig": "api.config",
    "KeepBestCheckpoint": "schedule",
    "LoggingHook": "api.hooks",
    "LossHistory": "api.hooks",
    "ModeKeys": "api.spec",
    "ModelDirInUseError": "state.locking",
    "NanLossDuringTrainingError": "api.hooks",
    "NanLossGuard": "api.hooks",
    "RecompilationError": "runtime.base",
    "ReplicaContext": "runtime.base",
    "ReplicaFailedError": "runtime.launcher",
    "ReplicaHungError": "runtime.launcher",
    "RunConfig": "api.config",
    "RunContext": "api.hooks",
    "StopAtStepHook": "api.hooks",
    "TPUConfig": "api.config",
    "TPUEstimator": "estimator",
    "TPUEstimatorSpec": "api.spec",
    "UpdateConfig": "api.config",
    "UpdateStep": "step.update",
    "WarmStartSettings": "api.warm_start_settings",
    "Window": "api.hooks",
    "load_exported": "export.serving",
    "train_and_evaluate": "schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _EXPORTS[name] == "export.serving":  # torch_xla's import configures the root logger
        from .common.logs import keeping_root_logging

        with keeping_root_logging():
            module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    else:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
    value = getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
