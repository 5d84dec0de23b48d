"""The small interface every backend implements, and what a replica knows about itself.

The loops talk only to this interface; a line in loops.py never asks which backend it runs on.
Two layouts exist: one process per replica (xla_mp, torch_dist), where each process traces
model_fn over its replica's share of the global batch, and one process driving every device
(xla_spmd), where model_fn traces one program over the whole global batch.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class Progress(enum.IntEnum):
    """Where a replica is, for the watchdog of a launcher that runs several (Runtime.heartbeat)."""

    STARTING = 0
    INPUT = 1
    MODEL_FN = 2
    UPDATE = 3
    HOST = 4


class RecompilationError(RuntimeError):
    """A mode traced more different step graphs than TPUConfig.max_graphs_per_mode allows."""


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What `params["context"]` tells input_fn and model_fn about where they run.

    replica_id / num_replicas: this replica and the replicas that share one global batch.
    input_pipeline_id / num_input_pipelines: which of the job's distinct input_fn streams this
      call feeds. Per-host input has one stream (the estimator shards it); per-replica input has
      one per replica, and input_fn must shard the data itself by input_pipeline_id.
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

    `num_replicas`, `num_processes` and `one_program` are known in the caller's process before
    any replica starts. Every other method is called inside a replica process, after `launch`.
    """

    name: str = ""
    num_replicas: int = 1  # devices sharing one global batch
    num_processes: int = 1  # processes that each run model_fn and read input
    one_program: bool = False  # True: one traced program spans every replica (SPMD)

    @abc.abstractmethod
    def launch(self, worker: Callable[[], T]) -> T:
        """Runs `worker` in every replica process and returns the chief's result in the caller."""

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device this process computes on."""

    @property
    def process_index(self) -> int:
        """This process's ordinal in [0, num_processes)."""
        return 0

    @property
    def local_replica_ids(self) -> list[int]:
        """The replicas this process feeds: its own, or every device's in SPMD."""
        return list(range(self.num_replicas)) if self.one_program else [self.process_index]

    @property
    def is_chief(self) -> bool:
        return self.process_index == 0

    @property
    def hands_result_to_caller(self) -> bool:
        """Whether this replica's result is the one `launch` returns to a caller."""
        return self.caller_is_replica or self.is_chief

    @property
    def caller_is_replica(self) -> bool:
        """Whether the caller's process is itself a replica (one process, or a torchrun rank),
        rather than a launcher of replica processes. Known before `launch`."""
        return self.num_processes == 1

    def model_fn_batch_size(self, global_batch_size: int) -> int:
        """The batch one model_fn call sees: a replica's share, or all of it in one program."""
        return global_batch_size if self.one_program else global_batch_size // self.num_replicas

    def context(self, mode: str, replica_id: int | None = None,
                input_pipeline: tuple[int, int] = (0, 1)) -> ReplicaContext:
        """The ReplicaContext of `replica_id` (this process's first replica by default)."""
        return ReplicaContext(
            replica_id=self.local_replica_ids[0] if replica_id is None else replica_id,
            num_replicas=self.num_replicas,
            input_pipeline_id=input_pipeline[0],
            num_input_pipelines=input_pipeline[1],
            device=str(self.device),
            mode=mode,
        )

    def prepare_model(self, model: torch.nn.Module, training: bool) -> torch.nn.Module:
        """Moves a freshly built model to this process's device (and wraps it for training)."""
        return model.to(self.device)

    @abc.abstractmethod
    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        """Moves host batches to the device, ahead of the step that needs them."""

    @abc.abstractmethod
    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Applies gradients, averaged over replicas."""

    def step_boundary(self) -> None:
        """Ends one step: cuts the traced graph where a backend traces one."""

    def step_runner(self, mode: str, max_graphs: int | None) -> Callable[[Callable[[], T]], T]:
        """A function that runs one step's body, then ends the step. XLA runtimes also hold
        `mode` to at most `max_graphs` different traced graphs (None: no limit)."""
        def run(body: Callable[[], T]) -> T:
            result = body()
            self.step_boundary()
            return result
        return run

    def device_counters(self) -> dict[str, float]:
        """Cumulative compile and transfer counts of this process, for the end-of-run report;
        empty where nothing is compiled."""
        return {}

    @abc.abstractmethod
    def to_host(self, tree: Any) -> Any:
        """Copies every tensor in a nested structure to CPU memory, in one transfer."""

    def host_gather(self, value: T) -> list[T]:
        """Every process's host value, in process order (one item with one process)."""
        return [value]

    def host_mean(self, values: np.ndarray) -> np.ndarray:
        """Element-wise mean of a host array over processes."""
        gathered = self.host_gather(values)
        return gathered[0] if len(gathered) == 1 else np.mean(gathered, axis=0)

    def stream(self, worker: Callable[[], Iterator[T]]) -> Iterator[T]:
        """Runs a generator `worker` in every replica process and yields the chief's items.

        A single process streams lazily, so a consumer that stops early stops the work; with
        several processes every replica runs to the end (its collectives need the others) and
        the items are gathered first.
        """
        if self.num_processes == 1:
            yield from worker()
            return

        def collect() -> list[T] | None:
            items = worker()
            if self.hands_result_to_caller:
                return list(items)
            for _ in items:  # a forked replica's items never reach the caller: drop them
                pass
            return None

        yield from self.launch(collect)

    def barrier(self, name: str) -> None:
        """Waits for every process to reach `name`."""

    def heartbeat(self, progress: Progress, step: int) -> None:
        """Tells the launcher's watchdog that this replica reached `progress` in step `step`
        (counted from 1 in this call); a host-side store, never a device read, and a no-op
        where no launcher watches."""

    def get_device_rng_state(self) -> int | None:
        """The device RNG seed where the device has its own RNG (XLA), else None."""
        return None

    def set_device_rng_state(self, state: int | None) -> None:
        """Restores what `get_device_rng_state` returned."""
