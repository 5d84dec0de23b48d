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

from .xla import XlaRuntime, replica_device_count

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


class XlaSpmdRuntime(XlaRuntime):
    """Data parallel over every device of this host in one process, partitioned by GSPMD."""

    name = "xla_spmd"
    one_program = True

    def __init__(self, num_shards: int | None = None):
        self.num_replicas = replica_device_count(num_shards)
        self._mesh: xs.Mesh | None = None

    def launch(self, worker: Callable[[], T]) -> T:
        if self._mesh is None:
            if not xr.is_spmd():  # before this process's first XLA tensor; it lasts for good
                xr.use_spmd()
            if xr.process_count() != 1:
                raise ValueError(
                    f"strategy='spmd' runs on one host; this job has {xr.process_count()} "
                    "processes. Use strategy='mp' across hosts"
                )
            devices = xr.global_runtime_device_count()
            self._mesh = xs.Mesh(np.arange(devices), (devices,), (DATA_AXIS,))
        return worker()

    def input_sharding(self) -> BatchAxisSharding:
        return BatchAxisSharding(self._mesh)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()  # gradients of replicated parameters are already reduced by GSPMD
