"""TensorFlow's TPUEstimator pattern for PyTorch/XLA: write model_fn and input_fn, then train."""

from .config import InputPipelineConfig, RunConfig, TPUConfig
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
from .runtime.base import RecompilationError, ReplicaContext
from .schedule import EarlyStopping, EvalHook, KeepBestCheckpoint, train_and_evaluate
from .spec import EstimatorSpec, ModeKeys, TPUEstimatorSpec

__all__ = [
    "EarlyStopping",
    "EvalHook",
    "KeepBestCheckpoint",
    "train_and_evaluate",
    "CheckpointSaverListener",
    "EstimatorSpec",
    "ExportedModel",
    "Hook",
    "InputPipelineConfig",
    "LoggingHook",
    "ModeKeys",
    "NanLossDuringTrainingError",
    "NanLossGuard",
    "RecompilationError",
    "ReplicaContext",
    "RunConfig",
    "RunContext",
    "StopAtStepHook",
    "TPUConfig",
    "TPUEstimator",
    "TPUEstimatorSpec",
    "Window",
    "load_exported",
]


def __getattr__(name: str):
    """load_exported and ExportedModel import torch_xla, so they load on first use: importing
    the package alone never starts torch_xla (plain PyTorch runs do not need it)."""
    if name in ("ExportedModel", "load_exported"):
        from . import serving
        return getattr(serving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
