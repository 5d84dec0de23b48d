"""Run configuration: where a run writes, how often it saves, and how replicas are laid out.

Plain dataclasses that validate themselves on construction, so a bad value fails at the line that
made it, long before any device work.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from .spec import ModeKeys

STRATEGIES = ("mp", "spmd")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive_int_or_none(name: str, value: int | None) -> None:
    _require(
        value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
        f"{name} must be a positive int or None, got {value!r}",
    )


def parse_iterations_per_loop(value: int | str) -> tuple[int | None, float | None]:
    """Returns (steps, seconds): a window of a fixed step count, or a time budget like "30s"."""
    if isinstance(value, int) and not isinstance(value, bool):
        _require(value > 0, f"iterations_per_loop must be a positive int, got {value}")
        return value, None
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match and float(match.group(1)) > 0:
            return None, float(match.group(1)) * _SECONDS_PER_UNIT[match.group(2)]
    raise ValueError(
        "iterations_per_loop must be a positive int or a duration such as '30s', '5m' or '1h', "
        f"got {value!r}"
    )


@dataclasses.dataclass(frozen=True)
class InputPipelineConfig:
    """How the estimator batches a `Dataset` that input_fn returns.

    shuffle: reshuffle training examples every pass, seeded by `RunConfig.seed` and the pass
      number, so a resumed run sees the same order. Eval and predict never shuffle.
    num_workers: DataLoader worker processes for that batching.
    """

    shuffle: bool = True
    num_workers: int = 0

    def __post_init__(self) -> None:
        _require(isinstance(self.shuffle, bool), f"shuffle must be a bool, got {self.shuffle!r}")
        _require(
            isinstance(self.num_workers, int) and self.num_workers >= 0,
            f"num_workers must be an int >= 0, got {self.num_workers!r}",
        )


@dataclasses.dataclass(frozen=True)
class TPUConfig:
    """How replicas run.

    iterations_per_loop: steps run on the device between two visits of the host (hooks, logs,
      summaries, checkpoints); an int, or a time budget such as "30s".
    num_shards: number of replicas. With use_tpu: None means every local device, and any other
      value must match it. With use_tpu=False: None is one process (or torchrun's WORLD_SIZE);
      N > 1 makes the estimator launch N CPU processes joined by gloo.
    per_host_input_for_training: True calls input_fn once per process with the global batch and
      gives each replica its rows of every batch; False calls it once per replica with the
      per-replica batch and `params["context"]` naming the shard input_fn must read. Eval and
      predict always read per-host input.
    strategy: XLA only. "mp" runs one process per device (xmp.spawn); "spmd" runs one process
      over a mesh of every local device (GSPMD), where model_fn sees the global batch.
    max_graphs_per_mode: XLA only. {mode: n} allows at most n different traced step graphs in
      that mode (ModeKeys.TRAIN "train", EVAL "eval", PREDICT "infer") per call of train,
      evaluate or predict; one more is a RecompilationError naming the mode, raised as the
      graph is traced (torch_xla.compile's max_different_graphs). Training with Adam-like
      optimizers traces 2 (the first step creates their state); eval and predict trace 1.
    replica_timeout_secs: how long replicas wait for one another. Processes the estimator
      launches (use_tpu=False, num_shards=N) are watched: when none of them makes progress for
      this long, the job ends with ReplicaHungError naming the replica the others wait for, and
      every process is stopped. Under torchrun it is the process group's collective timeout.
      It must exceed the longest pause of one replica: a compilation, a checkpoint write.
    """

    iterations_per_loop: int | str = 2
    num_shards: int | None = None
    per_host_input_for_training: bool = True
    strategy: str = "mp"
    max_graphs_per_mode: Mapping[str, int] | None = None
    replica_timeout_secs: float = 1800.0

    def __post_init__(self) -> None:
        parse_iterations_per_loop(self.iterations_per_loop)
        _require(isinstance(self.replica_timeout_secs, (int, float))
                 and not isinstance(self.replica_timeout_secs, bool)
                 and self.replica_timeout_secs > 0,
                 f"replica_timeout_secs must be a positive number of seconds, got "
                 f"{self.replica_timeout_secs!r}")
        _positive_int_or_none("num_shards", self.num_shards)
        _require(
            isinstance(self.per_host_input_for_training, bool),
            "per_host_input_for_training must be a bool, "
            f"got {self.per_host_input_for_training!r}",
        )
        _require(
            self.strategy in STRATEGIES,
            f"strategy must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        limits = self.max_graphs_per_mode
        _require(limits is None or isinstance(limits, Mapping),
                 f"max_graphs_per_mode must be a dict of mode -> int, got {limits!r}")
        for mode, limit in (limits or {}).items():
            _require(mode in ModeKeys.ALL,
                     f"max_graphs_per_mode has the key {mode!r}; modes are {ModeKeys.ALL}")
            _positive_int_or_none(f"max_graphs_per_mode[{mode!r}]", limit)

    def max_graphs(self, mode: str) -> int | None:
        """The most different step graphs `mode` may trace, or None for no limit."""
        return (self.max_graphs_per_mode or {}).get(mode)

    @property
    def window_steps(self) -> int | None:
        return parse_iterations_per_loop(self.iterations_per_loop)[0]

    @property
    def window_seconds(self) -> float | None:
        return parse_iterations_per_loop(self.iterations_per_loop)[1]


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How the estimator's training update is built (update.py).

    clip_global_norm: clips the gradients of each optimizer's parameters to this global L2
      norm, after they are averaged over replicas (tf.clip_by_global_norm).
    accumulation_steps: k > 1 splits every global batch into k micro-batches, runs model_fn and
      backward on each inside one compiled step, and updates once with their mean gradient:
      the update of one batch of train_batch_size, in k times less activation memory.
      train_batch_size must divide by k times the replica count.
    ema_decay: keeps an exponential moving average of the weights, updated after every step
      (ema = decay * ema + (1 - decay) * weights) and stored in checkpoints.
    ema_for_inference: evaluate, predict and export use the averaged weights when ema_decay
      is set.
    """

    clip_global_norm: float | None = None
    accumulation_steps: int = 1
    ema_decay: float | None = None
    ema_for_inference: bool = True

    def __post_init__(self) -> None:
        clip = self.clip_global_norm
        _require(clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                  and clip > 0),
                 f"clip_global_norm must be a positive number or None, got {clip!r}")
        _positive_int_or_none("accumulation_steps", self.accumulation_steps)
        _require(self.accumulation_steps is not None,
                 "accumulation_steps must be a positive int, got None")
        decay = self.ema_decay
        _require(decay is None or (isinstance(decay, float) and 0.0 < decay < 1.0),
                 f"ema_decay must be a float in (0, 1) or None, got {decay!r}")
        _require(isinstance(self.ema_for_inference, bool),
                 f"ema_for_inference must be a bool, got {self.ema_for_inference!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how often (checkpoints, summaries, logs), the seed, and how
    replicas, input and the update step are set up."""

    model_dir: str | None = None
    save_checkpoints_steps: int | None = 100
    keep_checkpoint_max: int | None = 5
    log_step_count_steps: int | None = 100
    save_summary_steps: int | None = 100
    seed: int = 0
    tpu_config: TPUConfig = dataclasses.field(default_factory=TPUConfig)
    input_config: InputPipelineConfig = dataclasses.field(default_factory=InputPipelineConfig)
    update_config: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)

    def __post_init__(self) -> None:
        _require(
            self.model_dir is None or isinstance(self.model_dir, str),
            f"model_dir must be a str or None, got {self.model_dir!r}",
        )
        for name in ("save_checkpoints_steps", "keep_checkpoint_max", "log_step_count_steps",
                     "save_summary_steps"):
            _positive_int_or_none(name, getattr(self, name))
        _require(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            f"seed must be an int >= 0, got {self.seed!r}",
        )
        _require(
            isinstance(self.tpu_config, TPUConfig),
            f"tpu_config must be a TPUConfig, got {type(self.tpu_config).__name__}",
        )
        _require(
            isinstance(self.input_config, InputPipelineConfig),
            f"input_config must be an InputPipelineConfig, got {type(self.input_config).__name__}",
        )
        _require(
            isinstance(self.update_config, UpdateConfig),
            f"update_config must be an UpdateConfig, got {type(self.update_config).__name__}",
        )

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)
