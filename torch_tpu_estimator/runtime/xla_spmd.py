"""One process over every local XLA device (GSPMD): `TPUConfig(strategy="spmd")`.

The devices form a mesh, and XLA partitions the traced step over it, gradient reduction
included. model_fn therefore traces one program over the whole global batch, so
`params["batch_size"]` in model_fn is the global batch here. How parameters lie on the mesh is
`TPUConfig.param_sharding`:

  replicated  a 1-D mesh ("data",): every device holds the whole model; the batch is split.
  fsdp        FSDPv2 (torch_xla's SpmdFullyShardedDataParallel): every parameter is split over
              the "fsdp" axis. With num_cores_per_replica=k, a (devices/k, k) mesh of axes
              ("data", "fsdp"): parameters split k ways, replicated over "data". The batch is
              split over every device.
  manual      a (devices/k, k) mesh of axes ("data", "model"); the user annotates parameters
              with xs.mark_sharding(tensor, params["context"].mesh, ...) in model_init_fn or
              model_fn; the batch is split over "data".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch_xla.distributed.spmd as xs
import torch_xla.runtime as xr
from torch.utils._pytree import tree_map_only

from ..api.config import TPUConfig
from . import xla_compat
from .base import Launcher, Replica, ReplicaContext, Topology
from .xla import XlaReplica, replica_device_count

T = TypeVar("T")

DATA_AXIS, FSDP_AXIS, MODEL_AXIS = "data", "fsdp", "model"


def mesh_axes(tpu_config: TPUConfig, devices: int) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """The mesh shape and axis names for `devices` devices under tpu_config's sharding."""
    cores = tpu_config.num_cores_per_replica or 1
    if devices % cores:
        raise ValueError(f"num_cores_per_replica={cores} does not divide the {devices} devices")
    second = {"fsdp": FSDP_AXIS, "manual": MODEL_AXIS}.get(tpu_config.param_sharding)
    if second is None:
        return (devices,), (DATA_AXIS,)
    if tpu_config.param_sharding == "fsdp" and cores == 1:
        return (devices,), (FSDP_AXIS,)
    return (devices // cores, cores), (DATA_AXIS, second)


def batch_axes(tpu_config: TPUConfig, axes: tuple[str, ...]) -> tuple[str, ...]:
    """The mesh axes a batch's first dimension is split over."""
    if tpu_config.param_sharding == "manual":
        return (DATA_AXIS,)
    return axes  # replicated and fsdp: every device gets its rows


class BatchAxisSharding:
    """Splits every input tensor along dim 0 over the batch axes; scalars are replicated.

    xm.send_cpu_data_to_device asks its `input_sharding` for `xla_spec(tensor)` and
    `minibatch`; one xs.ShardingSpec fits one tensor rank only, so this picks the spec by rank.
    """

    minibatch = False

    def __init__(self, mesh: xs.Mesh, axes: tuple[str, ...]):
        self.mesh = mesh
        self.batch = axes[0] if len(axes) == 1 else axes
        # torch_xla 2.9 cannot upload a 1-D tensor split over some axes of a mesh and replicated
        # over the others ("too many indices for tensor of dimension 1"): such tensors (labels,
        # with "manual" sharding) go replicated, and GSPMD partitions the step from the rest
        self.partial = len(axes) < len(mesh.axis_names)
        self._specs: dict[int, xs.ShardingSpec] = {}

    def xla_spec(self, tensor: torch.Tensor) -> Any:
        if tensor.dim() == 0 or (tensor.dim() == 1 and self.partial):
            return None
        if tensor.dim() not in self._specs:
            partition = (self.batch,) + (None,) * (tensor.dim() - 1)
            self._specs[tensor.dim()] = xs.ShardingSpec(self.mesh, partition)
        return self._specs[tensor.dim()].xla_spec(tensor)

    def mark(self, output: Any) -> None:
        """Marks every tensor of a module's output as split along its first (batch) dim: what
        FSDPv2 asks of the wrapped module's output."""
        tree_map_only(torch.Tensor, lambda tensor: xs.mark_sharding(
            tensor, self.mesh, (self.batch,) + (None,) * (tensor.dim() - 1))
            if tensor.dim() else None, output)


class SpmdReplica(XlaReplica):
    """Every device of this host, driven by one process; GSPMD reduces the gradients."""

    def __init__(self, topology: Topology, tpu_config: TPUConfig, mesh: xs.Mesh):
        super().__init__(topology)
        self.tpu_config, self.mesh = tpu_config, mesh
        self.batch_sharding = BatchAxisSharding(mesh, batch_axes(tpu_config, mesh.axis_names))

    def context(self, mode: str, replica_id: int | None = None,
                input_pipeline: tuple[int, int] = (0, 1)) -> ReplicaContext:
        return super().context(mode, replica_id, input_pipeline).with_mesh(self.mesh)

    def input_sharding(self) -> BatchAxisSharding:
        return self.batch_sharding

    def readable(self, outputs: Any) -> Any:
        # torch_xla reads a sharded tensor back through a replication program it compiles
        # anew for every read (ReplicateShardedData): predict compiled a graph per window.
        # Replicated inside the step instead, the outputs come back as they are.
        return tree_map_only(torch.Tensor, self._replicated, outputs)

    def _replicated(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() == 0:
            return tensor
        if xla_compat.sharding_of(tensor):  # an input (labels): annotate a copy, not it
            tensor = tensor + torch.zeros((), dtype=tensor.dtype, device=tensor.device)
        xs.mark_sharding(tensor, self.mesh, (None,) * tensor.dim())
        return tensor

    @property
    def shards_parameters(self) -> bool:
        return self.tpu_config.param_sharding != "replicated"

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.tpu_config.param_sharding != "fsdp":
            return model.to(self.device)
        from torch_xla.experimental.spmd_fully_sharded_data_parallel import (
            SpmdFullyShardedDataParallel,
        )

        extra = DATA_AXIS if DATA_AXIS in self.mesh.axis_names else None
        return SpmdFullyShardedDataParallel(
            model, mesh=self.mesh, extra_data_axis=extra,
            shard_output=lambda output, mesh: self.batch_sharding.mark(output))


class SpmdLauncher(Launcher):
    """Runs the one SPMD replica in the caller's process, in SPMD mode from its first call."""

    def __init__(self, tpu_config: TPUConfig):
        devices = replica_device_count(tpu_config.num_shards)
        shape, axes = mesh_axes(tpu_config, devices)
        ways = int(np.prod([size for size, axis in zip(shape, axes, strict=True)
                            if axis in batch_axes(tpu_config, axes)]))
        super().__init__(Topology("xla_spmd", ways, 1, one_program=True, use_tpu=True))
        self.tpu_config, self._shape, self._axes = tpu_config, shape, axes
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
            self._mesh = xs.Mesh(np.arange(devices), self._shape, self._axes)
        return worker(SpmdReplica(self.topology, self.tpu_config, self._mesh))
