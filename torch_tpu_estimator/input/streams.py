"""This process's input in one mode, as a component of the run's resumable state.

One InputPipeline per input_fn call this process makes (step/context.py decides which),
joined step by step. In training the streams remember how far the steps have read them (not how
far the loop has read ahead), and hand that position to the checkpoint and take it back
on resume, through state_dict / load_state_dict like every other stateful component.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

from ..api.config import DatasetConfig
from .batches import HostBatch, InputPosition, InputShard, concatenated
from .pipeline import InputPipeline

logger = logging.getLogger("torch_tpu_estimator")


class InputStreams:
    """input_fn's batches for this process, and where each of its streams stands.

    `shards` are the input_fn calls this process makes; `open_source(shard)` makes one (calls
    input_fn for it); `one_pass`: training reads to the end of one pass over the data (train()
    was given no step limit and DatasetConfig no num_epochs)."""

    def __init__(self, shards: list[InputShard], open_source: Callable[[InputShard], Any],
                 mode: str, dataset_config: DatasetConfig, seed: int, one_pass: bool = False):
        self.shards, self.open_source, self.one_pass = shards, open_source, one_pass
        self.mode, self.dataset_config, self.seed = mode, dataset_config, seed
        self.positions = {shard.key: InputPosition() for shard in self.shards}
        self.pipelines: list[InputPipeline] = []

    def host_batches(self) -> Iterator[HostBatch]:
        """Calls input_fn once per stream and yields this process's batches, each stream from
        its current position."""
        self.pipelines = [InputPipeline(self.open_source(shard), self.mode, shard,
                                        self.dataset_config, self.seed, self.one_pass)
                          for shard in self.shards]
        return concatenated([pipeline.batches(self.positions[pipeline.shard.key])
                             for pipeline in self.pipelines])

    def examples(self) -> int | None:
        """How many examples one pass of per-host input reads, when its source says so
        (after host_batches called input_fn)."""
        if len(self.pipelines) != 1 or self.pipelines[0].shard.key != "host":
            return None
        return self.pipelines[0].examples()

    def consumed(self, batch: HostBatch) -> None:
        """Marks `batch` as used by a step: a checkpoint now resumes after it."""
        self.positions.update(batch.positions)

    def state_dict(self) -> dict[str, dict[str, int]]:
        """This process's streams' positions (a checkpoint gathers every process's)."""
        return {key: dataclasses.asdict(position) for key, position in self.positions.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Takes this process's streams' positions from every stream's in a checkpoint; a
        stream the checkpoint does not know (another input layout wrote it) starts afresh."""
        for key in self.positions:
            if state and key not in state:
                logger.warning("the checkpoint holds no position for input stream %r (it was "
                               "written with another input layout): it starts from the first "
                               "batch of the data", key)
            self.positions[key] = InputPosition(**state.get(key, {}))
