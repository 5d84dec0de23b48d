"""One process per XLA device (TPU chip): xmp.spawn, MpDeviceLoader, xm.optimizer_step.

With one device (one TPU chip, or PJRT_DEVICE=CPU) the replica runs in the caller's process, so
`train` then `evaluate` then `predict` can share it. With several devices the caller never
touches the XLA runtime, so each call can spawn its replicas afresh (xmp.spawn refuses to start
once the runtime is up in the calling process).
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.distributed.parallel_loader as pl
import torch_xla.distributed.xla_multiprocessing as xmp
import torch_xla.runtime as xr

from .base import Runtime

T = TypeVar("T")

_pending_worker: Callable[[], Any] | None = None  # handed to forked replicas by inheritance


def local_device_count() -> int:
    """Devices xmp.spawn would use, found without starting the XLA runtime."""
    device_type = xr.device_type()
    if device_type == "TPU":
        from torch_xla._internal import tpu

        return tpu.num_expected_global_devices()
    if device_type in (None, "CPU"):
        return int(os.environ.get("CPU_NUM_DEVICES", "1"))
    return 1


class _InputFailure:
    """An exception raised by the host input, carried through MpDeviceLoader's threads."""

    def __init__(self, error: BaseException):
        self.error = error


def _capture_failures(host_batches: Iterable[Any]) -> Iterator[Any]:
    try:
        yield from host_batches
    except Exception as error:  # re-raised in the replica's own thread by device_batches
        yield _InputFailure(error)


def _run_pending_worker(_index: int, result_path: str) -> None:
    result = _pending_worker()
    if xr.global_ordinal() == 0:
        with open(result_path, "wb") as handle:
            pickle.dump(result, handle)


class XlaMpRuntime(Runtime):
    """Data parallel over XLA devices, one process per device."""

    name = "xla_mp"

    def __init__(self, num_shards: int | None = None):
        count = local_device_count()
        if num_shards is not None and num_shards != count:
            raise ValueError(
                f"num_shards={num_shards} does not match the {count} XLA device(s) found; "
                "leave num_shards=None or set <DEVICE>_NUM_DEVICES"
            )
        if count > 1 and xr.device_type() in (None, "CPU"):
            raise ValueError(
                f"strategy='mp' cannot run {count} XLA CPU devices: XLA:CPU has no cross-device "
                "collectives (pytorch/xla#9089). Use TPUConfig(strategy='spmd') for several CPU "
                "devices, or CPU_NUM_DEVICES=1"
            )
        self.num_replicas = count
        self.num_input_pipelines = count

    def launch(self, worker: Callable[[], T]) -> T:
        if self.num_replicas == 1:
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
    def device(self) -> torch.device:
        return torch_xla.device()

    @property
    def replica_id(self) -> int:
        return xr.global_ordinal()

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        # Steps are cut by step_boundary alone: every mark_step advances the XLA RNG seed, so
        # exactly one per step keeps dropout identical however windows and resumes fall.
        loader = pl.MpDeviceLoader(_capture_failures(host_batches), self.device,
                                   batches_per_execution=sys.maxsize)
        iterator = iter(loader)
        try:
            for batch in iterator:
                if isinstance(batch, _InputFailure):
                    raise batch.error
                yield batch
        finally:
            loader._parallel_loader.close()

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        xm.optimizer_step(optimizer)

    def step_boundary(self) -> None:
        torch_xla.sync()

    def to_host(self, tree: Any) -> Any:
        return xm._maybe_convert_to_cpu(tree)

    def host_mean(self, values: np.ndarray) -> np.ndarray:
        if self.num_replicas == 1:
            return values
        return xm.mesh_reduce("host_mean", values, lambda all_values: np.mean(all_values, axis=0))

    def host_gather(self, value: T) -> list[T]:
        if self.num_replicas == 1:
            return [value]
        return xm.mesh_reduce("host_gather", value, list)

    def stream(self, worker: Callable[[], Iterator[T]]) -> Iterator[T]:
        if self.num_replicas == 1:
            yield from worker()
        else:
            yield from self.launch(lambda: list(worker()))

    def host_any(self, flag: bool) -> bool:
        if self.num_replicas == 1:
            return flag
        return xm.mesh_reduce("host_any", flag, any)

    def barrier(self, name: str) -> None:
        if self.num_replicas > 1:
            xm.rendezvous(name)

    def get_device_rng_state(self) -> int | None:
        return xm.get_rng_state(self.device)

    def set_device_rng_state(self, state: int | None) -> None:
        if state is not None:
            xm.set_rng_state(state, self.device)
