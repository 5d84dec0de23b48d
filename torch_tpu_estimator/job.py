"""What a replica needs from the estimator to run one mode, and how it reads its input.

A Job is built in the caller's process and handed to every replica; its methods run inside a
replica, where they turn the runtime's layout into params for model_fn and input_fn calls.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

from .config import RunConfig
from .input import (
    HostBatch,
    InputPipeline,
    InputPosition,
    InputShard,
    call_input_fn,
    concatenated,
    input_shards,
)
from .runtime.base import Runtime
from .spec import ModeKeys
from .training_state import ModelInitFn, OptimizerFn

logger = logging.getLogger("torch_tpu_estimator")

ModelFn = Callable[..., Any]
InputFn = Callable[[dict], Any]


@dataclasses.dataclass(frozen=True)
class Job:
    """Everything a replica needs from the estimator to run one mode."""

    model_fn: ModelFn
    model_init_fn: ModelInitFn
    optimizer_fn: OptimizerFn | None
    params: dict
    config: RunConfig
    model_dir: str
    use_tpu: bool
    global_batch_size: int
    warm_start_from: str | None = None

    @property
    def per_host_input(self) -> bool:
        return self.config.tpu_config.per_host_input_for_training

    def input_shards(self, runtime: Runtime, mode: str) -> list[InputShard]:
        """The input_fn calls this process makes in `mode`."""
        return input_shards(runtime, mode, self.global_batch_size, self.per_host_input)

    def model_params(self, runtime: Runtime, mode: str) -> dict:
        """params for model_fn: the batch one model_fn call sees, and its replica's context."""
        return {**self.params, "batch_size": runtime.model_fn_batch_size(self.global_batch_size),
                "context": runtime.context(mode), "use_tpu": self.use_tpu}

    def host_batches(self, runtime: Runtime, mode: str, input_fn: InputFn,
                     positions: dict[str, InputPosition]) -> Iterator[HostBatch]:
        """This process's host batches: input_fn called once per InputShard (each from its
        saved position), batched and sliced, joined step by step when there are several."""
        streams = []
        for shard in self.input_shards(runtime, mode):
            params = {**self.params, "batch_size": shard.batch_size, "context": shard.context,
                      "use_tpu": self.use_tpu}
            pipeline = InputPipeline(call_input_fn(input_fn, params), mode, shard,
                                     self.config.input_config, self.config.seed)
            streams.append(pipeline.batches(positions.get(shard.key, InputPosition())))
        return concatenated(streams)

    def own_positions(self, runtime: Runtime, restored: dict[str, InputPosition]
                      ) -> dict[str, InputPosition]:
        """The restored positions of this process's training streams only, so that gathering
        every process's positions never lets a stale copy of another's win."""
        own = {}
        for shard in self.input_shards(runtime, ModeKeys.TRAIN):
            if restored and shard.key not in restored:
                logger.warning("the checkpoint holds no position for input stream %r (it was "
                               "written with another input layout): it starts from the first "
                               "batch of the data", shard.key)
            own[shard.key] = restored.get(shard.key, InputPosition())
        return own

    def agrees_each_step(self, runtime: Runtime, mode: str) -> bool:
        """Whether processes must agree before every step: when a time budget, or per-replica
        input whose streams may end at different steps, could make their windows differ."""
        uneven_input = mode == ModeKeys.TRAIN and not self.per_host_input
        timed = self.config.tpu_config.window_seconds is not None
        return runtime.num_processes > 1 and (timed or uneven_input)
