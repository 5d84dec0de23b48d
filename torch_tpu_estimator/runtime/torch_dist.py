"""Plain PyTorch (`use_tpu=False`): one process on CUDA or CPU, or several with torch.distributed.

Several replicas come from one of two launchers:
  - torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): the
    caller's process is one replica and every call runs in it, on every rank;
  - `TPUConfig(num_shards=N)` without torchrun: the estimator forks N CPU processes per call,
    joined by a gloo process group over a file store, and returns the chief's result.
Gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ..tree import map_tensors
from .base import Runtime
from .launcher import launch_processes

T = TypeVar("T")

_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def launched_world_size() -> int:
    """Processes in the job when an external launcher such as torchrun started this one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank when an external launcher such as torchrun started it, else 0."""
    return int(os.environ.get("RANK", "0")) if launched_world_size() > 1 else 0


class TorchRuntime(Runtime):
    """Eager PyTorch: in the caller's process, or over torch.distributed processes."""

    name = "torch"

    def __init__(self, num_shards: int | None = None):
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
                                        timeout=_COLLECTIVE_TIMEOUT)
            return worker()
        return launch_processes(self.num_processes, lambda rank, scratch: self._forked(
            rank, scratch, worker))

    def _forked(self, rank: int, scratch: str, worker: Callable[[], T]) -> T:
        self._rank = rank
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.num_processes))
        dist.init_process_group("gloo", init_method=f"file://{scratch}/store", rank=rank,
                                world_size=self.num_processes, timeout=_COLLECTIVE_TIMEOUT)
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
        model = model.to(self._device)
        if training and self.num_processes > 1:
            device_ids = [self._device.index] if self._device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        return model

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        non_blocking = self._device.type == "cuda"
        for batch in host_batches:
            yield map_tensors(lambda t: t.to(self._device, non_blocking=non_blocking), batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()  # DDP averaged the gradients during backward

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
