"""One process per XLA device (TPU chip): xmp.spawn, MpDeviceLoader, xm.optimizer_step.

With one device (one TPU chip, or PJRT_DEVICE=CPU) the replica runs in the caller's process, so
`train` then `evaluate` then `predict` can share it. With several devices the caller never
touches the XLA runtime, so each call can spawn its replicas afresh (xmp.spawn refuses to start
once the runtime is up in the calling process). Everything else, input sharding, gathering and
the loops, is the code that the SPMD and torch.distributed runtimes run with several replicas.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch_xla.core.xla_model as xm
import torch_xla.distributed.xla_multiprocessing as xmp
import torch_xla.runtime as xr

from .xla import XlaRuntime, is_cpu_backend, replica_device_count

T = TypeVar("T")

_pending_worker: Callable[[], Any] | None = None  # handed to forked replicas by inheritance


def _run_pending_worker(_index: int, result_path: str) -> None:
    result = _pending_worker()
    if xr.local_ordinal() == 0:
        with open(result_path, "wb") as handle:
            pickle.dump(result, handle)


class XlaMpRuntime(XlaRuntime):
    """Data parallel over XLA devices, one process per device."""

    name = "xla_mp"

    def __init__(self, num_shards: int | None = None):
        count = replica_device_count(num_shards)
        if count > 1 and is_cpu_backend():
            raise ValueError(
                f"strategy='mp' cannot run {count} XLA CPU devices: XLA:CPU has no cross-device "
                "collectives (pytorch/xla#9089). Use TPUConfig(strategy='spmd') for several CPU "
                "devices, or CPU_NUM_DEVICES=1"
            )
        self.num_replicas = self.num_processes = count

    def launch(self, worker: Callable[[], T]) -> T:
        if self.num_processes == 1:
            return worker()
        global _pending_worker
        _pending_worker = worker
        with tempfile.TemporaryDirectory() as scratch:
            result_path = os.path.join(scratch, "chief_result.pkl")
            try:
                xmp.spawn(_run_pending_worker, args=(result_path,), start_method="fork")
            finally:
                _pending_worker = None
            with open(result_path, "rb") as handle:
                return pickle.load(handle)

    @property
    def process_index(self) -> int:
        return xr.global_ordinal()

    @property
    def hands_result_to_caller(self) -> bool:
        # every host runs the caller's script; each host's first replica answers its caller
        # (results are gathered to every replica, so they are the chief's)
        return xr.local_ordinal() == 0

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        xm.optimizer_step(optimizer)

    def host_gather(self, value: T) -> list[T]:
        if self.num_processes == 1:
            return [value]
        return xm.mesh_reduce("host_gather", value, list)

    def barrier(self, name: str) -> None:
        if self.num_processes > 1:
            xm.rendezvous(name)
