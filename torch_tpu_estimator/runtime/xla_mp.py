"""One process per XLA device (TPU chip): xmp.spawn, xm.reduce_gradients, xm.mesh_reduce.

With one device (one TPU chip, or PJRT_DEVICE=CPU) the replica runs in the caller's process, so
`train` then `evaluate` then `predict` can share it. With several devices the caller never
touches the XLA runtime, so each call can spawn its replicas afresh (xmp.spawn refuses to start
once the runtime is up in the calling process). A script that launches itself the torch_xla way
(`xmp.spawn(_mp_fn)`, the estimator built inside `_mp_fn`) is recognised from the environment
PJRT sets in spawned processes: each of them is one replica, as under torchrun, and nothing is
spawned again. Everything else, input sharding, gathering and the loops, is the code that the
SPMD and torch.distributed runtimes run with several replicas.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch_xla.core.xla_env_vars as xenv
import torch_xla.core.xla_model as xm
import torch_xla.distributed.xla_multiprocessing as xmp
import torch_xla.runtime as xr

from .base import Launcher, Replica, Topology
from .xla import XlaReplica, is_cpu_backend, replica_device_count

T = TypeVar("T")

# xmp.spawn hands its function to a ProcessPoolExecutor, which pickles it; the forked replicas
# inherit this process's memory, so the worker (a closure over the user's model_fn) waits here.
_spawned_worker: list[Callable[[], Any]] = []


def _run_spawned_worker(_index: int, result_path: str) -> None:
    result = _spawned_worker[0]()
    if xr.local_ordinal() == 0:
        with open(result_path, "wb") as handle:
            pickle.dump(result, handle)


def launched_by_xmp_spawn() -> bool:
    """Whether this process is one that xmp.spawn started (PJRT sets the local process count)."""
    return xenv.PJRT_LOCAL_PROCESS_COUNT in os.environ


class XlaMpReplica(XlaReplica):
    """One XLA device of a job with one process per device."""

    @property
    def answers_caller(self) -> bool:
        # every host runs the caller's script; each host's first replica answers its caller
        return xr.local_ordinal() == 0

    def reduce_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        if self.topology.num_processes > 1:
            xm.reduce_gradients(_ParameterHolder(parameters))

    def host_gather(self, value: T) -> list[T]:
        if self.topology.num_processes == 1:
            return [value]
        return xm.mesh_reduce("host_gather", value, list)

    def barrier(self, name: str) -> None:
        if self.topology.num_processes > 1:
            xm.rendezvous(name)


class _ParameterHolder:
    """What xm.reduce_gradients reads of an optimizer: its parameter groups."""

    def __init__(self, parameters: Sequence[torch.Tensor]):
        self.param_groups = [{"params": list(parameters)}]


class XmpLauncher(Launcher):
    """In the caller's process for one device or a self-launched replica; xmp.spawn otherwise."""

    def __init__(self, num_shards: int | None = None):
        if launched_by_xmp_spawn():
            count = xr.world_size()
            topology = Topology("xla_mp", count, count, use_tpu=True, caller_is_replica=True)
        else:
            count = replica_device_count(num_shards)
            if count > 1 and is_cpu_backend():
                raise ValueError(
                    f"strategy='mp' cannot run {count} XLA CPU devices: XLA:CPU has no "
                    "cross-device collectives (pytorch/xla#9089). Use TPUConfig(strategy='spmd') "
                    "for several CPU devices, or CPU_NUM_DEVICES=1")
            topology = Topology("xla_mp", count, count, use_tpu=True,
                                caller_is_replica=count == 1)
        super().__init__(topology)

    @property
    def caller_is_chief(self) -> bool:
        return not launched_by_xmp_spawn() or xr.global_ordinal() == 0

    def _replica(self) -> XlaMpReplica:
        index = xr.global_ordinal() if self.topology.num_processes > 1 else 0
        return XlaMpReplica(self.topology, index)

    def _launch(self, worker: Callable[[Replica], T]) -> T:
        if self.topology.caller_is_replica:
            return worker(self._replica())
        _spawned_worker[:] = [lambda: worker(self._replica())]
        try:
            with tempfile.TemporaryDirectory() as scratch:
                result_path = os.path.join(scratch, "chief_result.pkl")
                xmp.spawn(_run_spawned_worker, args=(result_path,), start_method="fork")
                with open(result_path, "rb") as handle:
                    return pickle.load(handle)
        finally:
            _spawned_worker.clear()
