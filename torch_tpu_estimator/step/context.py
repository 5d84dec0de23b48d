"""A replica's job in one mode, bound once inside the replica (TF's _InternalTPUContext).

Two concerns: binding the user's functions (the params model_fn and input_fn see, reserved
keys built here and only here; calling them by argument name) and the input layout (which
input_fn calls this process makes, the batch each call sees). How the call runs its steps is
the ExecutionPlan (plan.py), built once here. Export and `eval_on_tpu=False` bind the same way,
to a plain PyTorch replica (CPU, or CUDA when present).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..api.binding import INPUT_FN_ARGUMENTS, bind
from ..api.config import RunConfig
from ..api.job import InputFn, Job
from ..api.spec import ModeKeys, TPUEstimatorSpec, validate_spec
from ..input.batches import InputShard
from ..input.seeding import derive_seed, seeded
from ..input.sources import call_input_fn
from ..input.streams import InputStreams
from ..runtime.base import Replica, ReplicaContext
from .plan import ExecutionPlan

T = TypeVar("T")


class ModeContext:
    """The Job bound to one Replica and one mode."""

    def __init__(self, job: Job, replica: Replica, mode: str):
        self.job, self.replica, self.mode = job, replica, mode

    @property
    def config(self) -> RunConfig:
        return self.job.config

    @property
    def model_dir(self) -> str:
        return self.job.model_dir

    @property
    def is_chief(self) -> bool:
        return self.replica.is_chief

    @property
    def global_batch_size(self) -> int:
        """The constructor's batch size for this mode: every replica's rows of one step."""
        size = self.job.batch_sizes[self.mode]
        assert size is not None, "the estimator checks batch sizes before launching"
        return size

    @property
    def batch_size(self) -> int:
        """The rows one model_fn call sees: a replica's share, or all of them in one program."""
        return self.replica.topology.model_fn_batch_size(self.global_batch_size)

    def params(self, batch_size: int, context: ReplicaContext) -> dict:
        """The user's params with the reserved keys: the one place they are made."""
        return {**self.job.params, "batch_size": batch_size, "context": context,
                "use_tpu": self.replica.topology.use_tpu}

    def model_params(self, batch_size: int | None = None) -> dict:
        """params for model_fn (`batch_size` overrides the batch, as export's traced sizes do)."""
        return self.params(self.batch_size if batch_size is None else batch_size,
                           self.replica.context(self.mode))

    @property
    def per_host_input(self) -> bool:
        """Per-replica input is a training layout only, as in TPUEstimator: eval and predict
        read per-host input so that no example is dropped or seen twice."""
        return (self.config.tpu_config.per_host_input or self.mode != ModeKeys.TRAIN
                or self.replica.topology.num_replicas == 1)

    def input_shards(self) -> list[InputShard]:
        """The input_fn calls this process makes: one per host, or one per local replica."""
        topology = self.replica.topology
        if self.per_host_input:
            return [InputShard("host", self.replica.context(self.mode), self.global_batch_size,
                               self.replica.process_index, topology.num_processes)]
        replicas = topology.num_replicas
        return [InputShard(f"replica{replica}",
                           self.replica.context(self.mode, replica, (replica, replicas)),
                           self.global_batch_size // replicas)
                for replica in self.replica.local_replica_ids]

    def call_input_fn(self, input_fn: InputFn, shard: InputShard) -> Any:
        """What input_fn returns for one of this process's input streams. It runs with the
        host generators seeded by the run seed, the mode and the stream (input/seeding.py):
        data it draws is the same in every call, resumed or not, and on every process."""
        binding = bind(input_fn, "input_fn", INPUT_FN_ARGUMENTS, params_alone=True)
        params = self.params(shard.batch_size, shard.context)
        with seeded(derive_seed(self.config.seed, "input_fn", self.mode, shard.key)):
            return call_input_fn(lambda: binding(params=params, mode=self.mode,
                                                 config=self.config, input_context=shard.context),
                                 shard.batch_size, self.mode)

    def input_streams(self, input_fn: InputFn, one_pass: bool = False) -> InputStreams:
        """This process's input streams in this mode: one per input_fn call it makes."""
        return InputStreams(self.input_shards(), lambda shard: self.call_input_fn(input_fn, shard),
                            self.mode, self.config.dataset_config, self.config.seed, one_pass)

    def call_model_fn(self, model: torch.nn.Module, features: Any, labels: Any,
                      params: dict, update: Any = None) -> TPUEstimatorSpec:
        """model_fn's spec for one batch, its arguments bound by name, checked for this mode.
        PREDICT gets labels=None, as in TF; `update` (TRAIN) is the UpdateStep model_fn may
        take charge of."""
        with torch.autocast(self.replica.device.type, dtype=torch.bfloat16,
                            enabled=self.config.tpu_config.precision == "bf16"):
            spec = self.job.model_fn(
                model=model, features=features, mode=self.mode, params=params,
                config=self.config, labels=None if self.mode == ModeKeys.PREDICT else labels,
                update=update)
        return validate_spec(spec, self.mode,
                             manual_update=update is not None and update.took_charge)

    @functools.cached_property
    def plan(self) -> ExecutionPlan:
        """How this call runs its steps (plan.py), decided once."""
        return ExecutionPlan.of(self.config, self.mode, self.replica.topology,
                                self.replica.replays_programs, self.per_host_input)

    def step_runner(self) -> Callable[[Callable[[], T]], T]:
        """Runs one step's body as one device program (the plan's recompilation guard)."""
        return self.replica.step_runner(self.mode, self.plan.max_graphs)
