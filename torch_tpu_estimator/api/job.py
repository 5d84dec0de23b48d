"""What the estimator hands to its replicas: the user's functions, params, config, batch sizes.

A Job is built once, in the caller's process, and checked there; inside a replica it is bound to
the replica's handle and a mode (context.ModeContext), which answers everything mode-specific.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .binding import Binding
from .config import RunConfig
from .warm_start_settings import WarmStartSettings

ModelInitFn = Callable[[dict], torch.nn.Module]
OptimizerFn = Callable[[torch.nn.Module, dict], Any]
InputFn = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a replica needs from the estimator, in any mode."""

    model_fn: Binding
    model_init_fn: ModelInitFn
    optimizer_fn: OptimizerFn | None
    params: Mapping[str, Any]
    config: RunConfig
    model_dir: str
    batch_sizes: Mapping[str, int | None]
    warm_start_from: WarmStartSettings | None = None
