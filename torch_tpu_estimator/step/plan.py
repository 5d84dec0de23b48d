"""How one call runs its steps, decided once when it starts: the window (a step count or a time
budget), the steps per device program, replay, whether processes agree before every step, and
the recompilation guard. Frozen: every part of the loop reads the same answers."""

from __future__ import annotations

import dataclasses
import math

from ..api.config import RunConfig
from ..api.spec import ModeKeys
from ..api.tpu_config import parse_iterations_per_loop
from ..runtime.base import Topology


def steps_per_program(setting: int, window_steps: int | None) -> int:
    """How many steps one program runs: `setting`, or with step-count windows its largest
    divisor of the window size, so every full window splits into equal groups (one graph)."""
    if window_steps is None:
        return setting
    return max(size for size in range(1, min(setting, window_steps) + 1)
               if window_steps % size == 0)


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """window_steps / window_seconds: a window's size or time budget (math.inf when unset).
    steps_per_program: steps traced into one device program (1 in training; in evaluate and
    predict TPUConfig.inference_steps_per_execution fitted to the window). replay: evaluate and
    predict replay their compiled program (TPUConfig.replay_inference, where the replica can);
    replay_training: training does (TPUConfig.replay_training), where one process drives XLA
    (one device or an SPMD mesh: collectives between processes in a replayed program are not
    tested on this project's CPU machines).
    agree_each_step: processes agree before every step, when a time budget or per-replica input
    whose streams may end apart could make their windows differ. max_graphs: the most step
    graphs the mode may trace (TPUConfig.max_graphs_per_mode), or None."""

    window_steps: float
    window_seconds: float
    steps_per_program: int
    replay: bool
    replay_training: bool
    agree_each_step: bool
    max_graphs: int | None

    @classmethod
    def of(cls, config: RunConfig, mode: str, topology: Topology, replays_programs: bool,
           per_host_input: bool) -> ExecutionPlan:
        tpu_config = config.tpu_config
        steps, seconds = parse_iterations_per_loop(tpu_config.iterations_per_loop)
        inference = mode != ModeKeys.TRAIN
        return cls(
            window_steps=steps or math.inf, window_seconds=seconds or math.inf,
            steps_per_program=steps_per_program(tpu_config.inference_steps_per_execution, steps)
            if inference else 1,
            replay=inference and tpu_config.replay_inference and replays_programs,
            replay_training=not inference and tpu_config.replay_training and replays_programs
            and topology.num_processes == 1,
            agree_each_step=topology.num_processes > 1 and (seconds is not None
                                                            or not per_host_input),
            max_graphs=tpu_config.max_graphs(mode))
