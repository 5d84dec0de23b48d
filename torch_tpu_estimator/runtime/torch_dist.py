"""Plain PyTorch (`use_tpu=False`): one process on CUDA or CPU, or several with torch.distributed.

Several replicas come from one of two launchers:
  - torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): the
    caller's process is one replica and every call runs in it, on every rank;
  - `TPUConfig(num_shards=N)` without torchrun: the estimator forks N CPU processes per call,
    joined by a gloo process group over a file store, and returns the chief's result.
Gradients are averaged by one all_reduce per step over a flat buffer in parameter order (gloo on
CPU, nccl on CUDA): unlike DDP's buckets, its layout never changes, so a resumed run sums in the
same order as an uninterrupted one.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..common.tree import map_tensors
from .base import Launcher, Progress, Replica, Topology
from .launcher import Heartbeats, launch_processes

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes in the job when an external launcher such as torchrun started this one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank when an external launcher such as torchrun started it, else 0."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def reduce_gradients(parameters: Sequence[torch.Tensor], world_size: int) -> None:
    """Averages the parameters' gradients over every process, in one all_reduce of one flat
    buffer laid out in parameter order, so that every step sums each element in the same order
    (DDP re-buckets gradients after its first step, and with more than two processes the sums
    then differ in the last bit between a run and its resumed copy). A presence flag per
    parameter travels along: a gradient that no process has stays None, one that some process
    lacks counts as zeros there."""
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not parameters:
        return
    has_grad = [parameter.grad is not None for parameter in parameters]
    present = torch.tensor(has_grad, dtype=parameters[0].dtype, device=parameters[0].device)
    grads = [parameter.grad if parameter.grad is not None else torch.zeros_like(parameter)
             for parameter in parameters]
    flat = _flatten_dense_tensors([*grads, present])
    dist.all_reduce(flat)
    flat /= world_size
    *reduced, anywhere = _unflatten_dense_tensors(flat, [*grads, present])
    if not all(has_grad):  # read back only here: a process with every gradient never syncs
        has_grad = [bool(flag) for flag in anywhere.tolist()]
    for parameter, grad, value, keep in zip(parameters, grads, reduced, has_grad, strict=True):
        if not keep:
            parameter.grad = None
        elif parameter.grad is None:
            parameter.grad = value.clone()
        else:
            grad.copy_(value)


def _pick_device() -> torch.device:
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _join_launched_group(timeout_secs: float) -> None:
    """Joins the process group of the job torchrun started, and leaves it at interpreter exit."""
    device = _pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=timeout_secs))
    atexit.register(_leave_launched_group)


def _leave_launched_group() -> None:
    """Destroys the group while the interpreter is whole: left to its teardown, gloo's worker
    threads can abort a process that finished its work (SIGABRT, "terminate called without an
    active exception", pytorch/pytorch#190489). A failed call unregisters this: the group is
    then left to die with the process, as in a forked replica, so peers see no disconnect first."""
    if dist.is_initialized():
        dist.destroy_process_group()


class TorchReplica(Replica):
    """Eager PyTorch in one process of the job, on CUDA or the CPU."""

    def __init__(self, topology: Topology, process_index: int = 0,
                 heartbeats: Heartbeats | None = None, device: torch.device | None = None):
        super().__init__(topology, process_index)
        self._device = device or _pick_device()
        self._heartbeats = heartbeats

    @property
    def device(self) -> torch.device:
        return self._device

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        non_blocking = self._device.type == "cuda"
        for batch in host_batches:
            yield map_tensors(lambda t: t.to(self._device, non_blocking=non_blocking), batch)

    def reduce_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        if self.topology.num_processes > 1:
            reduce_gradients(parameters, self.topology.num_processes)

    def to_host(self, tree: Any) -> Any:
        return map_tensors(lambda t: t.detach().cpu(), tree)

    def host_gather(self, value: T) -> list[T]:
        if self.topology.num_processes == 1:
            return [value]
        gathered: list[Any] = [None] * self.topology.num_processes
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self, name: str) -> None:
        if self.topology.num_processes > 1:
            dist.barrier()

    def heartbeat(self, progress: Progress, step: int) -> None:
        if self._heartbeats is not None:
            self._heartbeats.beat(self.process_index, progress, step)


def cpu_replica() -> TorchReplica:
    """A one-process replica on the CPU, for work done in the caller (export)."""
    return TorchReplica(Topology("torch"), device=torch.device("cpu"))


class TorchLauncher(Launcher):
    """Eager PyTorch: in the caller's process, a torchrun rank, or N forked gloo processes."""

    def __init__(self, num_shards: int | None = None, timeout_secs: float = 1800.0):
        launched = launched_world_size()
        if launched > 1 and num_shards not in (None, launched):
            raise ValueError(f"num_shards={num_shards} differs from WORLD_SIZE={launched} set by "
                             "the launcher (torchrun); leave num_shards=None")
        external = launched > 1
        processes = launched if external else (num_shards or 1)
        if processes > 1 and not external and torch.cuda.is_available():
            raise ValueError(
                f"num_shards={num_shards} on CUDA: launch one process per GPU with torchrun "
                "(the estimator forks CPU replicas only, and CUDA cannot be forked)")
        super().__init__(Topology("torch", processes, processes,
                                  caller_is_replica=processes == 1 or external))
        self._external = external
        self._timeout_secs = timeout_secs

    @property
    def caller_is_chief(self) -> bool:
        return not self._external or launched_rank() == 0

    def _launch(self, worker: Callable[[Replica], T]) -> T:
        if self.topology.num_processes == 1:
            return worker(TorchReplica(self.topology))
        if self._external:
            if not dist.is_initialized():
                _join_launched_group(self._timeout_secs)
            try:
                return worker(TorchReplica(self.topology, launched_rank()))
            except BaseException:
                atexit.unregister(_leave_launched_group)
                raise
        return launch_processes(
            self.topology.num_processes,
            lambda rank, scratch, heartbeats: self._forked(rank, scratch, heartbeats, worker),
            timeout_secs=self._timeout_secs)

    def _forked(self, rank: int, scratch: str, heartbeats: Heartbeats,
                worker: Callable[[Replica], T]) -> T:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.topology.num_processes))
        # the launcher's watchdog names a hung replica after timeout_secs; the collectives'
        # own timeout comes later, as a backstop
        dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=rank,
                                world_size=self.topology.num_processes,
                                timeout=datetime.timedelta(seconds=2 * self._timeout_secs))
        result = worker(TorchReplica(self.topology, rank, heartbeats))
        # on an error the group is left to die with the process, so that peers see no
        # disconnect before the error is reported
        dist.destroy_process_group()
        return result
