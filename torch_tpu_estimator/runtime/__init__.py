"""Backends where replicas live: a Launcher per backend, and the Replica handle each gives its
workers (base.py)."""

from __future__ import annotations

from ..api.config import TPUConfig
from ..common.logs import keeping_root_logging
from .base import Launcher, Replica, ReplicaContext, Topology

__all__ = ["Launcher", "Replica", "ReplicaContext", "Topology", "resolve_launcher"]


def resolve_launcher(use_tpu: bool, tpu_config: TPUConfig) -> Launcher:
    """Picks the backend: XLA by `strategy` when use_tpu, plain PyTorch otherwise (whose runs
    never import torch_xla)."""
    if not use_tpu:
        from .torch_dist import TorchLauncher

        return TorchLauncher(tpu_config.num_shards, tpu_config.replica_timeout_secs)
    with keeping_root_logging():  # torch_xla's import configures the root logger
        if tpu_config.strategy == "spmd":
            from .xla_spmd import SpmdLauncher

            return SpmdLauncher(tpu_config)
        from .xla_mp import XmpLauncher

        return XmpLauncher(tpu_config.num_shards)
