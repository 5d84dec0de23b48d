"""Plain PyTorch: one process on CUDA when present, else CPU.

This is the `use_tpu=False` runtime: the same model_fn and input_fn, no XLA tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch

from ..tree import map_tensors
from .base import Runtime

T = TypeVar("T")


class TorchRuntime(Runtime):
    """Eager PyTorch in the caller's process."""

    name = "torch"

    def __init__(self, num_shards: int | None = None):
        if num_shards not in (None, 1):
            raise ValueError(
                f"num_shards={num_shards} needs several processes; this runtime runs one"
            )
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def launch(self, worker: Callable[[], T]) -> T:
        return worker()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def replica_id(self) -> int:
        return 0

    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        non_blocking = self._device.type == "cuda"
        for batch in host_batches:
            yield map_tensors(lambda t: t.to(self._device, non_blocking=non_blocking), batch)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()

    def to_host(self, tree: Any) -> Any:
        return map_tensors(lambda t: t.detach().cpu(), tree)
