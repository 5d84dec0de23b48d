"""The small interface every backend implements, and what a replica knows about itself.

The loops talk only to this interface; a line in loops.py never asks which backend it runs on.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What `params["context"]` tells input_fn and model_fn about the replica they run on.

    num_replicas: replicas that share one global batch.
    input_pipeline_id / num_input_pipelines: which of the input_fn calls this one is; each call
      feeds `global_batch / num_input_pipelines` examples per step.
    """

    replica_id: int
    num_replicas: int
    input_pipeline_id: int
    num_input_pipelines: int
    device: str
    mode: str = ""

    @property
    def is_chief(self) -> bool:
        return self.replica_id == 0


class Runtime(abc.ABC):
    """Where replicas live: launching them, feeding them, stepping them, reading results back.

    The attributes `num_replicas` and `num_input_pipelines` are known in the caller's process
    before any replica starts. Every other method is called inside a replica, after `launch`.
    """

    name: str = ""
    num_replicas: int = 1
    num_input_pipelines: int = 1

    @abc.abstractmethod
    def launch(self, worker: Callable[[], T]) -> T:
        """Runs `worker` on every replica and returns the chief's result in the caller."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device this replica computes on."""

    @property
    @abc.abstractmethod
    def replica_id(self) -> int:
        """This replica's ordinal in [0, num_replicas)."""

    @property
    def input_pipeline_id(self) -> int:
        return self.replica_id if self.num_input_pipelines > 1 else 0

    @property
    def is_chief(self) -> bool:
        return self.replica_id == 0

    def context(self, mode: str) -> ReplicaContext:
        return ReplicaContext(
            replica_id=self.replica_id,
            num_replicas=self.num_replicas,
            input_pipeline_id=self.input_pipeline_id,
            num_input_pipelines=self.num_input_pipelines,
            device=str(self.device),
            mode=mode,
        )

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Moves a freshly built model to this replica's device (and wraps it if needed)."""
        return model.to(self.device)

    @abc.abstractmethod
    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        """Moves host batches to the device, ahead of the step that needs them."""

    @abc.abstractmethod
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Applies gradients, averaged over replicas."""

    def step_boundary(self) -> None:
        """Ends one step: cuts the traced graph where a backend traces one."""

    @abc.abstractmethod
    def to_host(self, tree: Any) -> Any:
        """Copies every tensor in a nested structure to CPU memory, in one transfer."""

    def host_mean(self, values: np.ndarray) -> np.ndarray:
        """Element-wise mean of a host array over replicas (identity with one replica)."""
        return values

    def host_gather(self, value: T) -> list[T]:
        """Every replica's host value, in replica order (a one-item list with one replica)."""
        return [value]

    def stream(self, worker: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Runs a generator `worker` on every replica and yields the chief's items in the caller.

        Replicas living in the caller's process are streamed lazily, so a consumer that stops
        early stops the work; a launcher of separate processes gathers the items first.
        """
        yield from worker()

    def host_any(self, flag: bool) -> bool:
        """True when any replica's flag is true (identity with one replica)."""
        return flag

    def barrier(self, name: str) -> None:
        """Waits for every replica to reach `name`."""

    def get_device_rng_state(self) -> int | None:
        """The device RNG seed where the device has its own RNG (XLA), else None."""
        return None

    def set_device_rng_state(self, state: int | None) -> None:
        """Restores what `get_device_rng_state` returned."""
