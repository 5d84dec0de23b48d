"""TensorFlow's TPUEstimator pattern for PyTorch/XLA: write model_fn and input_fn, then train."""

from .config import DatasetConfig, InputPipelineConfig, RunConfig, TPUConfig, UpdateConfig
from .estimator import TPUEstimator
from .hooks import (
    CheckpointSaverListener,
    Hook,
    LoggingHook,
    NanLossDuringTrainingError,
    NanLossGuard,
    RunContext,
    StopAtStepHook,
    Window,
)
from .locking import ModelDirInUseError
from .runtime.base import RecompilationError, ReplicaContext
from .runtime.launcher import ReplicaFailedError, ReplicaHungError
from .schedule import EarlyStopping, KeepBestCheckpoint, train_and_evaluate
from .spec import EstimatorSpec, ModeKeys, TPUEstimatorSpec
from .update import UpdateStep

__all__ = [
    "CheckpointSaverListener",
    "DatasetConfig",
    "EarlyStopping",
    "EstimatorSpec",
    "ExportedModel",
    "Hook",
    "InputPipelineConfig",
    "KeepBestCheckpoint",
    "LoggingHook",
    "ModeKeys",
    "ModelDirInUseError",
    "NanLossDuringTrainingError",
    "NanLossGuard",
    "RecompilationError",
    "ReplicaContext",
    "ReplicaFailedError",
    "ReplicaHungError",
    "RunConfig",
    "RunContext",
    "StopAtStepHook",
    "TPUConfig",
    "TPUEstimator",
    "TPUEstimatorSpec",
    "UpdateConfig",
    "UpdateStep",
    "Window",
    "load_exported",
    "train_and_evaluate",
]


def __getattr__(name: str):
    """load_exported and ExportedModel import torch_xla, so they load on first use: importing
    the package alone never starts torch_xla (plain PyTorch runs do not need it)."""
    if name in ("ExportedModel", "load_exported"):
        from . import serving
        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
