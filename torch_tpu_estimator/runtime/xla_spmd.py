"""One process over every local XLA device (GSPMD): `TPUConfig(strategy="spmd")`.

The model is replicated on a 1-D mesh whose axis is named "data"; each global batch is laid over
the mesh along its first dimension as MpDeviceLoader uploads it, and XLA partitions the traced
step, gradient reduction included. model_fn therefore traces one program over the whole global
batch, so `params["batch_size"]` in model_fn is the global batch here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr

from .base import Launcher, Replica, Topology
from .xla import XlaReplica, replica_device_count

T = TypeVar("T")

DATA_AXIS = "data"


class BatchAxisSharding:
    """Splits every input tensor along dim 0 over the mesh; scalars are replicated.

    MpDeviceLoader asks its `input_sharding` for `xla_spec(tensor)` and `minibatch`; one
    xs.ShardingSpec fits one tensor rank only, so this picks the spec by rank.
    """

    minibatch = False

    def __init__(self, mesh: xs.Mesh):
        self.mesh = mesh
        self._specs: dict[int, xs.ShardingSpec] = {}

    def xla_spec(self, tensor: torch.Tensor) -> Any:
        if tensor.dim() == 0:
            return None
        if tensor.dim() not in self._specs:
            partition = (DATA_AXIS,) + (None,) * (tensor.dim() - 1)
            self._specs[tensor.dim()] = xs.ShardingSpec(self.mesh, partition)
        return self._specs[tensor.dim()].xla_spec(tensor)


class SpmdReplica(XlaReplica):
    """Every device of this host, driven by one process; GSPMD reduces the gradients."""

    def __init__(self, topology: Topology, mesh: xs.Mesh):
        super().__init__(topology)
        self.mesh = mesh

    def input_sharding(self) -> BatchAxisSharding:
        return BatchAxisSharding(self.mesh)


class SpmdLauncher(Launcher):
    """Runs the one SPMD replica in the caller's process, in SPMD mode from its first call."""

    def __init__(self, num_shards: int | None = None):
        count = replica_device_count(num_shards)
        super().__init__(Topology("xla_spmd", count, 1, one_program=True, use_tpu=True))
        self._mesh: xs.Mesh | None = None

    def _launch(self, worker: Callable[[Replica], T]) -> T:
        if self._mesh is None:
            if not xr.is_spmd():  # before this process's first XLA tensor; it lasts for good
                xr.use_spmd()
            if xr.process_count() != 1:
                raise ValueError(
                    f"strategy='spmd' runs on one host; this job has {xr.process_count()} "
                    "processes. Use strategy='mp' across hosts")
            devices = xr.global_runtime_device_count()
            self._mesh = xs.Mesh(np.arange(devices), (devices,), (DATA_AXIS,))
        return worker(SpmdReplica(self.topology, self._mesh))
