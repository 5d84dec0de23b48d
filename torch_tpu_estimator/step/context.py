"""A replica's job in one mode, bound once inside the replica (TF's _InternalTPUContext).

The Job, the Replica handle and the mode together answer every question the loops ask: the
params model_fn and input_fn see (reserved keys built here and only here), which input_fn calls
this process makes, the batch each call sees, chief-ness, the step runner and the window
settings. Export and `eval_on_tpu=False` bind the same way, to a plain PyTorch replica (CPU, or
CUDA when present).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from ..api.binding import INPUT_FN_ARGUMENTS, bind
from ..api.config import RunConfig
from ..api.job import InputFn, Job
from ..api.spec import ModeKeys, TPUEstimatorSpec, validate_spec
from ..input.pipeline import InputShard, call_input_fn
from ..input.seeding import derive_seed, seeded
from ..input.streams import InputStreams
from ..runtime.base import Replica, ReplicaContext
from .windows import steps_per_program

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
        host generators seeded by the run seed, the mode and the stream (host_random.py):
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

    def step_runner(self) -> Callable[[Callable[[], T]], T]:
        return self.replica.step_runner(self.mode,
                                        self.config.tpu_config.max_graphs(self.mode))

    @property
    def steps_per_program(self) -> int:
        """Steps traced into one device program: 1 in training; in evaluate and predict,
        TPUConfig.inference_steps_per_execution fitted to the window."""
        if self.mode == ModeKeys.TRAIN:
            return 1
        tpu_config = self.config.tpu_config
        return steps_per_program(tpu_config.inference_steps_per_execution,
                                 tpu_config.window_steps)

    @property
    def replays_inference(self) -> bool:
        """Whether evaluate and predict replay their compiled step (TPUConfig.replay_inference)
        here: in those modes, on a replica that can."""
        return (self.mode != ModeKeys.TRAIN and self.config.tpu_config.replay_inference
                and self.replica.replays_programs)

    @property
    def agrees_each_step(self) -> bool:
        """Whether processes must agree before every step: when a time budget, or per-replica
        input whose streams may end at different steps, could make their windows differ."""
        timed = self.config.tpu_config.window_seconds is not None
        return self.replica.topology.num_processes > 1 and (timed or not self.per_host_input)
