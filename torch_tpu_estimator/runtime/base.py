"""Where replicas live, in two halves: a Launcher runs a worker on every replica process and
brings back the chief's result; a Replica is one process's handle on its device and its peers,
and exists only inside a replica, after launch.

The loops talk only to Replica and never ask which backend they run on; what differs beyond
it asks the replica's properties (shards_parameters: sharded checkpoints, no flat optimizer;
replays_programs: replay) or, for storage, the tensors themselves.
Two layouts exist: one process per replica (xla_mp, torch_dist), where each process traces
model_fn over its replica's share of the global batch, and one process driving every device
(xla_spmd), where model_fn traces one program over the whole global batch.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

from ..common.logs import replica_logging

logger = logging.getLogger("torch_tpu_estimator")
T = TypeVar("T")


class RecompilationError(RuntimeError):
    """A mode traced more different step graphs than TPUConfig.max_graphs_per_mode allows."""


class Progress(enum.IntEnum):
    """Where a replica is in a step, for the watchdog of a launcher that runs several
    (Replica.heartbeat). In the order a step passes them: (step, phase) only grows."""

    STARTING = 0
    INPUT = 1  # waiting for the step's batch
    HOST = 2  # at a window end, before the step (host work, collectives, checkpoint)
    MODEL_FN = 3
    UPDATE = 4


@dataclasses.dataclass(frozen=True)
class Topology:
    """What is known of a job's replicas before any of them starts.

    num_replicas: devices sharing one global batch. num_processes: processes that each run
    model_fn and read input. one_program: one traced program spans every replica (SPMD).
    use_tpu: the replicas run on XLA. caller_is_replica: the caller's process is itself a
    replica (one process, a torchrun rank), not a launcher of replica processes.
    """

    name: str
    num_replicas: int = 1
    num_processes: int = 1
    one_program: bool = False
    use_tpu: bool = False
    caller_is_replica: bool = True

    def model_fn_batch_size(self, global_batch_size: int) -> int:
        """The batch one model_fn call sees: a replica's share, or all of it in one program."""
        return global_batch_size if self.one_program else global_batch_size // self.num_replicas


@dataclasses.dataclass(frozen=True)
class ReplicaContext:
    """What `params["context"]` tells input_fn and model_fn about where they run.

    Attributes:
        replica_id: this replica, 0 to num_replicas - 1 (0 is the chief).
        num_replicas: the replicas that share one global batch.
        input_pipeline_id: which of the job's distinct input_fn streams this call feeds.
            Per-host input has one stream (the estimator shards it); per-replica input has one
            per replica, and input_fn must shard the data itself by input_pipeline_id.
        num_input_pipelines: how many distinct input_fn streams the job has.
        device: the device this replica computes on, as a string ("xla:0", "cpu").
        mode: the ModeKeys value of the call ("" outside one).
        mesh: on an SPMD mesh, the torch_xla.distributed.spmd.Mesh, for the user's own
            xs.mark_sharding annotations (TPUConfig(param_sharding="manual")); else None.
    """

    replica_id: int
    num_replicas: int
    input_pipeline_id: int
    num_input_pipelines: int
    device: str
    mode: str = ""
    mesh: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def is_chief(self) -> bool:
        return self.replica_id == 0

    def with_mesh(self, mesh: Any) -> ReplicaContext:
        return dataclasses.replace(self, mesh=mesh)


class Replica(abc.ABC):
    """One replica process's view of its device and of the other replicas."""

    def __init__(self, topology: Topology, process_index: int = 0):
        self.topology = topology
        self.process_index = process_index

    @property
    @abc.abstractmethod
    def device(self) -> torch.device:
        """The device this process computes on."""

    @property
    def is_chief(self) -> bool:
        return self.process_index == 0

    @property
    def shards_parameters(self) -> bool:
        """Whether parameters are split over devices (checkpoints then go shard by shard)."""
        return False

    @property
    def replays_programs(self) -> bool:
        """Whether a compiled step program can run again on new inputs without tracing
        (replay.py, TPUConfig.replay_inference)."""
        return False

    @property
    def answers_caller(self) -> bool:
        """Whether this replica's result is the one its host's caller receives."""
        return self.is_chief

    @property
    def local_replica_ids(self) -> list[int]:
        """The replicas this process feeds: its own, or every device's in SPMD."""
        if self.topology.one_program:
            return list(range(self.topology.num_replicas))
        return [self.process_index]

    def context(self, mode: str, replica_id: int | None = None,
                input_pipeline: tuple[int, int] = (0, 1)) -> ReplicaContext:
        """The ReplicaContext of `replica_id` (this process's first replica by default)."""
        return ReplicaContext(
            replica_id=self.local_replica_ids[0] if replica_id is None else replica_id,
            num_replicas=self.topology.num_replicas, input_pipeline_id=input_pipeline[0],
            num_input_pipelines=input_pipeline[1], device=str(self.device), mode=mode)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Moves a freshly built module to this process's device."""
        return model.to(self.device)

    def restorable(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict read from a checkpoint (CPU tensors), ready to load into a module on
        this device (its own copy_ moves each tensor)."""
        return weights

    @abc.abstractmethod
    def device_batches(self, host_batches: Iterable[Any]) -> Iterator[Any]:
        """Moves host batches to the device, ahead of the step that needs them."""

    def reduce_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Averages the parameters' gradients over replicas (a no-op with one replica, and
        where the compiler reduces them: SPMD)."""

    def readable(self, outputs: Any) -> Any:
        """A step's outputs laid out to be read back cheaply at the window's end (on an SPMD
        mesh: replicated inside the step, rather than gathered by a separate program)."""
        return outputs

    def step_runner(self, mode: str, max_graphs: int | None) -> Callable[[Callable[[], T]], T]:
        """A function that runs one step's body, then ends the step. XLA replicas also hold
        `mode` to at most `max_graphs` different traced graphs (None: no limit)."""
        def run(body: Callable[[], T]) -> T:
            return body()
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

    def barrier(self, name: str) -> None:
        """Waits for every process to reach `name`."""

    def get_device_rng_state(self) -> int | None:
        """The device RNG seed where the device has its own RNG (XLA), else None."""
        return None

    def set_device_rng_state(self, state: int | None) -> None:
        """Restores what `get_device_rng_state` returned."""

    def heartbeat(self, progress: Progress, step: int) -> None:
        """Tells the launcher's watchdog that this replica reached `progress` in step `step`
        (counted from 1 in this call); a host-side store, never a device read, and a no-op
        where no launcher watches."""


def _portable_state(hook: Any) -> dict | None:
    """A hook's attributes when they pickle (to travel from a replica process), else None."""
    try:
        return pickle.loads(pickle.dumps(vars(hook)))
    except Exception:
        logger.warning("%s's attributes do not pickle: they stay in the replica process",
                       type(hook).__name__)
        return None


class Launcher(abc.ABC):
    """Runs a worker on every replica process of a Topology, and brings back what the caller
    needs: the chief's result, the chief's hook attributes, or the root error."""

    def __init__(self, topology: Topology):
        self.topology = topology

    @property
    def caller_is_chief(self) -> bool:
        """Whether the caller's process speaks for the job (writes what only one may write):
        it is, unless it is a replica other than the chief (a torchrun rank > 0)."""
        return True

    @abc.abstractmethod
    def _launch(self, worker: Callable[[Replica], T]) -> T:
        """Runs worker(replica) in every replica process; returns the result the caller gets."""

    def run(self, worker: Callable[[Replica], T], hooks: Sequence[Any] = ()) -> T:
        """Runs worker(replica) on every replica; only the chief logs progress. When the
        replicas are not the caller's process, the chief's hook attributes are copied back
        into the caller's hook objects."""
        def as_replica(replica: Replica) -> T:
            with replica_logging(replica.is_chief):
                return worker(replica)

        if self.topology.caller_is_replica or not hooks:
            return self._launch(as_replica)
        result, states = self._launch(lambda replica: (as_replica(replica), [
            _portable_state(hook) if replica.is_chief else None for hook in hooks]))
        for hook, state in zip(hooks, states, strict=True):
            if state is not None:
                vars(hook).update(state)
        return result

    def run_on_chief(self, work: Callable[[], T]) -> T:
        """work() in the caller; when every process of the job called this (torchrun ranks),
        the chief alone runs it, every process returns its result, and its error, if any, is
        raised everywhere."""
        if not (self.topology.caller_is_replica and self.topology.num_processes > 1):
            return work()

        def on_chief(replica: Replica) -> T:
            outcome = None
            if replica.is_chief:
                try:
                    outcome = ("result", work())
                except Exception as error:
                    replica.host_gather(("error", f"{type(error).__name__}: {error}"))
                    raise
            kind, value = replica.host_gather(outcome)[0]
            if kind == "error":
                raise RuntimeError(f"the chief (rank 0) failed: {value}")
            return value

        return self._launch(on_chief)

    def stream(self, worker: Callable[[Replica], Iterator[T]]) -> Iterator[T]:
        """Runs a generator worker on every replica and yields the chief's items.

        A replica in the caller's process streams lazily, so a consumer that stops early stops
        the work; replica processes of their own run to the end (their collectives need one
        another) and the chief's items are gathered first.
        """
        def items(replica: Replica) -> Iterator[T]:
            with replica_logging(replica.is_chief):
                yield from worker(replica)

        if self.topology.caller_is_replica:
            holder: list[Iterator[T]] = []
            self._launch(lambda replica: holder.append(items(replica)))
            yield from holder[0]
            return

        def collect(replica: Replica) -> list[T] | None:
            produced = items(replica)
            if replica.answers_caller:
                return list(produced)
            for _ in produced:  # a replica's items that never reach the caller: drop them
                pass
            return None

        yield from self._launch(collect)
