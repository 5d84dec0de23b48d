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

import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from ..tree import map_tensors
from .base import Progress, Runtime
from .launcher import Heartbeats, launch_processes

T = TypeVar("T")


def launched_world_size() -> int:
    """Processes in the job when an external launcher such as torchrun started this one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank when an external launcher such as torchrun started it, else 0."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


def reduce_gradients(parameters: list[torch.Tensor], world_size: int) -> None:
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


class TorchRuntime(Runtime):
    """Eager PyTorch: in the caller's process, or over torch.distributed processes."""

    name = "torch"

    def __init__(self, num_shards: int | None = None, timeout_secs: float = 1800.0):
        launched = launched_world_size()
        if launched > 1 and num_shards not in (None, launched):
            raise ValueError(f"num_shards={num_shards} differs from WORLD_SIZE={launched} set by "
                             "the launcher (torchrun); leave num_shards=None")
        self._external = launched > 1
        self.num_replicas = self.num_processes = launched if self._external else (num_shards or 1)
        if self.num_processes > 1 and not self._external and torch.cuda.is_available():
            raise ValueError(
                f"num_shards={num_shards} on CUDA: launch one process per GPU with torchrun "
                "(the estimator forks CPU replicas only, and CUDA cannot be forked)"
            )
        self._rank = launched_rank()
        self._device = self._pick_device()
        self._timeout_secs = timeout_secs
        self._heartbeats: Heartbeats | None = None

    def _pick_device(self) -> torch.device:
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    def launch(self, worker: Callable[[], T]) -> T:
        if self.num_processes == 1:
            return worker()
        if self._external:
            if not dist.is_initialized():
                if self._device.type == "cuda":
                    torch.cuda.set_device(self._device)
                dist.init_process_group("nccl" if self._device.type == "cuda" else "gloo",
                                        timeout=datetime.timedelta(seconds=self._timeout_secs))
            return worker()
        return launch_processes(
            self.num_processes,
            lambda rank, scratch, heartbeats: self._forked(rank, scratch, heartbeats, worker),
            timeout_secs=self._timeout_secs)

    def _forked(self, rank: int, scratch: str, heartbeats: Heartbeats,
                worker: Callable[[], T]) -> T:
        self._rank, self._heartbeats = rank, heartbeats
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.num_processes))
        # the launcher's watchdog names a hung replica after timeout_secs; the collectives'
        # own timeout comes later, as a backstop
        dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=rank,
                                world_size=self.num_processes,
                                timeout=datetime.timedelta(seconds=2 * self._timeout_secs))
        result = worker()  # on an error the group is left to die with the process, so that
        dist.destroy_process_group()  # peers see no disconnect before the error is reported
        return result

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def caller_is_replica(self) -> bool:
        return self.num_processes == 1 or self._external

    @property
    def process_index(self) -> int:
        return self._rank

    def prepare_model(self, model: torch.nn.Module, training: bool) -> torch.nn.Module:
        return model.to(self._device)

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        non_blocking = self._device.type == "cuda"
        for batch in host_batches:
            yield map_tensors(lambda t: t.to(self._device, non_blocking=non_blocking), batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.num_processes > 1:
            reduce_gradients([parameter for group in optimizer.param_groups
                              for parameter in group["params"]], self.num_processes)
        optimizer.step()

    def to_host(self, tree: Any) -> Any:
        return map_tensors(lambda t: t.detach().cpu(), tree)

    def host_gather(self, value: T) -> list[T]:
        if self.num_processes == 1:
            return [value]
        gathered: list[Any] = [None] * self.num_processes
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self, name: str) -> None:
        if self.num_processes > 1:
            dist.barrier()

    def heartbeat(self, progress: Progress, step: int) -> None:
        if self._heartbeats is not None:
            self._heartbeats.beat(self._rank, progress, step)
