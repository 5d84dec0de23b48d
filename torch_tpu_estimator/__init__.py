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
from .runtime.base import ReplicaContext
from .schedule import EarlyStopping, EvalHook, KeepBestCheckpoint, train_and_evaluate
from .spec import EstimatorSpec, ModeKeys, TPUEstimatorSpec

__all__ = [
    "EarlyStopping",
    "EvalHook",
    "KeepBestCheckpoint",
    "train_and_evaluate",
    "CheckpointSaverListener",
    "EstimatorSpec",
    "Hook",
    "InputPipelineConfig",
    "LoggingHook",
    "ModeKeys",
    "NanLossDuringTrainingError",
    "NanLossGuard",
    "ReplicaContext",
    "RunConfig",
    "RunContext",
    "StopAtStepHook",
    "TPUConfig",
    "TPUEstimator",
    "TPUEstimatorSpec",
    "Window",
]
