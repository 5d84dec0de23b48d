"""Backends where replicas live, behind one interface (base.Runtime)."""

from __future__ import annotations

from ..config import TPUConfig
from .base import ReplicaContext, Runtime

__all__ = ["ReplicaContext", "Runtime", "resolve_runtime"]


def resolve_runtime(use_tpu: bool, tpu_config: TPUConfig) -> Runtime:
    """Picks the backend: XLA by `strategy` when use_tpu, plain PyTorch otherwise."""
    if not use_tpu:
        from .torch_dist import TorchRuntime

        return TorchRuntime(tpu_config.num_shards, tpu_config.replica_timeout_secs)
    if tpu_config.strategy == "spmd":
        from .xla_spmd import XlaSpmdRuntime

        return XlaSpmdRuntime(tpu_config.num_shards)
    from .xla_mp import XlaMpRuntime

    return XlaMpRuntime(tpu_config.num_shards)
