"""What every XLA replica shares: the device, how batches reach it, graph cuts, RNG, reads.

xla_mp (one process per device) and xla_spmd (one process over a device mesh) differ only in how
replicas are launched, how input is laid over devices and how gradients are combined.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch_xla
import torch_xla.core.xla_model as xm
import torch_xla.debug.metrics as met
import torch_xla.runtime as xr

from . import xla_compat
from .base import RecompilationError, Replica

T = TypeVar("T")

SENT_AHEAD = 2  # batches on their way to the device while a step is traced


def _call(body: Callable[[], T]) -> T:
    return body()


def local_device_count() -> int:
    """XLA devices on this host, found without starting the XLA runtime."""
    device_type = xr.device_type()
    if device_type == "TPU":
        return xla_compat.expected_tpu_devices()
    if device_type in (None, "CPU"):
        return int(os.environ.get("CPU_NUM_DEVICES", "1"))
    return 1


def replica_device_count(num_shards: int | None) -> int:
    """The local device count, checked against TPUConfig.num_shards (None: every device)."""
    count = local_device_count()
    if num_shards is not None and num_shards != count:
        raise ValueError(
            f"num_shards={num_shards} does not match the {count} XLA device(s) found; "
            "XLA runtimes use every device: leave num_shards=None or set <DEVICE>_NUM_DEVICES"
        )
    return count


def is_cpu_backend() -> bool:
    return xr.device_type() in (None, "CPU")


class XlaReplica(Replica):
    """Device batches made in the training thread and sent by one of their own, one graph cut
    per step, reads in one transfer."""

    def input_sharding(self) -> Any:
        """How a host batch is laid over devices (xm.send_cpu_data_to_device); None puts it on
        this device."""
        return None

    @property
    def device(self) -> torch.device:
        return torch_xla.device()

    @property
    def replays_programs(self) -> bool:
        return True  # one device or an SPMD mesh alike: every batch is laid out alike

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        # Each batch is made in this thread, as the loop asks for the one SENT_AHEAD batches
        # before it: the input draws from the host generators seeded per example and batch
        # (input/seeding.py), which a second thread drawing beside model_fn would disturb. Its
        # copy to the device runs in a thread of its own, as MpDeviceLoader's do: a transfer
        # made while the device is busy waits on the busy cores, and this thread meanwhile
        # traces the next step. Steps are cut by the step runner alone: every mark_step
        # advances the XLA RNG seed, so a fixed number per step keeps dropout identical
        # however windows and resumes fall.
        sharding = self.input_sharding()
        batches = iter(host_batches)
        with concurrent.futures.ThreadPoolExecutor(1, "torch_tpu_estimator-send") as sender:
            sent: collections.deque = collections.deque()

            def send_next() -> None:
                batch = next(batches, None)
                if batch is not None:
                    sent.append(sender.submit(xm.send_cpu_data_to_device, [batch], self.device,
                                              sharding))

            for _ in range(SENT_AHEAD):
                send_next()
            while sent:
                transfer = sent.popleft()
                send_next()
                yield transfer.result()[0]

    def restorable(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A 0-dim tensor copied to an XLA device takes the device value torch_xla caches for a
        # Python number equal to it, which the step's constants share: the first step after a
        # restore then read one graph input fewer whenever a restored scalar (a batch norm's
        # num_batches_tracked) equalled one of them, and compiled again. Sent as data, each
        # scalar gets a buffer of its own.
        scalars = {name: tensor for name, tensor in weights.items() if tensor.dim() == 0}
        if not scalars:
            return weights
        sent = xm.send_cpu_data_to_device(list(scalars.values()), self.device)
        return {**weights, **dict(zip(scalars, sent, strict=True))}

    def step_runner(self, mode: str, max_graphs: int | None) -> Callable[[Callable[[], T]], T]:
        if max_graphs is None:
            def run(body: Callable[[], T]) -> T:
                result = body()
                torch_xla.sync()
                return result
            return run
        # A new (tiny) function per run: torch_xla.compile keys its graph count by the function,
        # so each call of train/evaluate/predict counts afresh (torch_xla keeps that small
        # record for the process's life). It syncs before and after the body: two graph cuts a
        # step instead of one, so device random draws (dropout) differ from an unguarded run.
        guarded = torch_xla.compile(functools.partial(_call), name=f"torch_tpu_estimator_{mode}",
                                    max_different_graphs=max_graphs)

        def run_guarded(body: Callable[[], T]) -> T:
            try:
                return guarded(body)
            except RuntimeError as error:
                if "Maximum number of different graphs" not in str(error):
                    raise
                raise RecompilationError(
                    f"mode {mode!r} traced a step graph unlike the {max_graphs} allowed by "
                    f"TPUConfig.max_graphs_per_mode[{mode!r}]; each new graph is an XLA "
                    "compilation. Usual causes: input shapes that change between steps, a Python "
                    "number that changes every step used in tensor math (pass it as a tensor), "
                    "control flow on tensor values. torch_xla: "
                    + " ".join(str(error).split("\n")[:2])) from None
        return run_guarded

    def device_counters(self) -> dict[str, float]:
        xm.wait_device_ops()  # executions are counted as they complete (once per call, not a step)
        compiles = met.metric_data("CompileTime") or (0, 0.0)
        return {"compilations": compiles[0], "compile_seconds": compiles[1] / 1e9,
                "executions": sum((met.metric_data(name) or (0,))[0]  # SPMD: replicated
                                  for name in ("ExecuteTime", "ExecuteReplicatedTime")),
                "transfers_to_host": (met.metric_data("TransferFromDeviceTime") or (0,))[0]}

    def to_host(self, tree: Any) -> Any:
        return xla_compat.to_cpu(tree)

    def get_device_rng_state(self) -> int | None:
        return xm.get_rng_state(self.device)

    def set_device_rng_state(self, state: int | None) -> None:
        if state is not None:
            xm.set_rng_state(state, self.device)
