"""Backends where replicas live, behind one interface (base.Runtime)."""

from __future__ import annotations

from ..config import TPUConfig
from .base import ReplicaContext, Runtime

__all__ = ["ReplicaContext", "Runtime", "resolve_runtime"]


def resolve_runtime(use_tpu: bool, tpu_config: TPUConfig) -> Runtime:
    """Picks the backend: XLA when use_tpu, plain PyTorch otherwise."""
    if use_tpu:
        from .xla_mp import XlaMpRuntime

        return XlaMpRuntime(tpu_config.num_shards)
    from .torch_dist import TorchRuntime

    return TorchRuntime(tpu_config.num_shards)
