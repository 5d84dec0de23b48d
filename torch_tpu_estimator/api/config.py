"""Run configuration: where a run writes, how often it saves, and how replicas are laid out.

Plain dataclasses that validate themselves on construction, so a bad value fails at the line that
made it, long before any device work.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import Any

from .spec import ModeKeys

STRATEGIES = ("mp", "spmd")
PARAM_SHARDINGS = ("replicated", "fsdp", "manual")
PRECISIONS = ("fp32", "bf16")
PROGRESS_STYLES = ("auto", "bar", "log", "off")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def require_positive_int(name: str, value: Any, optional: bool = True) -> None:
    """ValueError naming `name` unless `value` is an int > 0 (bools are not), or None when
    `optional`."""
    if optional and value is None:
        return
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


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


class InputPipelineConfig:
    """TF's names for where input_fn runs in training (TPUConfig.per_host_input_for_training),
    with TF's values, so that ported code reads as it did. How each maps onto this project's
    two layouts is in TPUConfig."""

    PER_SHARD_V1 = 1
    PER_HOST_V1 = 2
    PER_HOST_V2 = 3
    BROADCAST = 4
    SLICED = 5


_INPUT_MODES = {name: value for name, value in vars(InputPipelineConfig).items()
                if name.isupper()}
_PER_HOST_MODES = (InputPipelineConfig.PER_HOST_V1, InputPipelineConfig.BROADCAST,
                   InputPipelineConfig.SLICED)


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """How the estimator batches what input_fn returns.

    shuffle: reshuffle a map-style Dataset's training examples every pass, seeded by
      `RunConfig.seed` and the pass number, so a resumed run sees the same order. Eval and
      predict never shuffle.
    num_workers: DataLoader worker processes for that batching.
    num_epochs: passes over the training data, counted since the model_dir's first step (as
      max_steps counts steps): training ends after that many, or at the step limit if one
      comes first. None repeats the data until the step limit; with no step limit either
      (train(input_fn) alone), each train() call reads to the end of one pass, as TF's
      Estimator does with a Dataset that is not repeated.
    """

    shuffle: bool = True
    num_workers: int = 0
    num_epochs: int | None = None

    def __post_init__(self) -> None:
        _require(isinstance(self.shuffle, bool), f"shuffle must be a bool, got {self.shuffle!r}")
        _require(
            isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
            and self.num_workers >= 0,
            f"num_workers must be an int >= 0, got {self.num_workers!r}",
        )
        require_positive_int("num_epochs", self.num_epochs)


def _ignored_tf_arguments(owner: str, arguments: dict[str, object]) -> None:
    """Warns once that TF-graph-only arguments a ported script passes have no effect here."""
    given = sorted(name for name, value in arguments.items() if value is not None)
    if given and (owner, tuple(given)) not in _WARNED:
        _WARNED.add((owner, tuple(given)))
        warnings.warn(f"{owner} ignores {', '.join(given)}: they configure TF graphs and sessions, "
                      "which PyTorch/XLA does not have", stacklevel=4)


_WARNED: set[tuple[str, tuple[str, ...]]] = set()


@dataclasses.dataclass(frozen=True)
class TPUConfig:
    """How replicas run.

    iterations_per_loop: steps run on the device between two visits of the host (hooks, logs,
      summaries, checkpoints); an int, or a time budget such as "30s".
    num_shards: number of replicas. With use_tpu: None means every local device, and any other
      value must match it. With use_tpu=False: None is one process (or torchrun's WORLD_SIZE);
      N > 1 makes the estimator launch N CPU processes joined by gloo.
    per_host_input_for_training: where input_fn runs in training, as a bool or by TF's names
      (InputPipelineConfig). Per-host (True, PER_HOST_V1, and BROADCAST and SLICED, which
      deliver the same batches when input_fn is deterministic): input_fn is called once per
      process with the global batch, and each replica keeps its rows of every batch.
      Per-replica (False, PER_SHARD_V1, and PER_HOST_V2 where a host drives one replica):
      input_fn is called once per replica with the per-replica batch and `params["context"]`
      naming the shard it must read. PER_HOST_V2 on an SPMD mesh (one process, several
      replicas) is refused: use PER_HOST_V1 or PER_SHARD_V1. Eval and predict always read
      per-host input.
    experimental_host_call_every_n_steps: the TRAIN spec's host_call runs for every n-th step
      only (its tensors are kept and read back for those steps alone). With n > 1 the steps
      that keep them trace a graph of their own: one more compiled graph in training.
    param_sharding: SPMD only; how parameters lie over the mesh. "replicated": every device
      holds the whole model (data parallel). "fsdp": fully sharded data parallel (torch_xla's
      FSDPv2): each parameter is split over the "fsdp" axis, gathered for the step.
      "manual": the user's own xs.mark_sharding annotations, in model_init_fn or model_fn, on
      the mesh found as params["context"].mesh.
    num_cores_per_replica: SPMD only; devices per model replica (TF's name): a 2-D mesh of
      (devices / k) x k. With "fsdp" its axes are ("data", "fsdp"), each parameter split over k
      devices and replicated over "data"; with "manual", ("data", "model"). The batch is split
      over every device (fsdp) or over "data" (manual).
    precision: "bf16" runs model_fn under torch.autocast in bfloat16 (XLA, CPU or CUDA alike),
      with float32 weights and optimizer state; "fp32" (the default) does not.
    strategy: XLA only. "mp" runs one process per device (xmp.spawn); "spmd" runs one process
      over a mesh of every local device (GSPMD), where model_fn sees the global batch.
    max_graphs_per_mode: XLA only. {mode: n} allows at most n different traced step graphs in
      that mode (ModeKeys.TRAIN "train", EVAL "eval", PREDICT "infer") per call of train,
      evaluate or predict; one more is a RecompilationError naming the mode, raised as the
      graph is traced (torch_xla.compile's max_different_graphs). Training with Adam-like
      optimizers traces 2 (the first step creates their state); eval and predict trace 1, or 2
      with inference_steps_per_execution > 1 (full groups, and the last window's rest).
    replica_timeout_secs: how long replicas wait for one another. Processes the estimator
      launches (use_tpu=False, num_shards=N) are watched: when none of them makes progress for
      this long, the job ends with ReplicaHungError naming the replica the others wait for, and
      every process is stopped. Under torchrun it is the process group's collective timeout.
      It must exceed the longest pause of one replica: a compilation, a checkpoint write.
    inference_steps_per_execution: evaluate and predict trace up to this many steps into one
      XLA program (Keras' steps_per_execution; TF's TPUEstimator runs a window's steps per
      session.run), so the host's work between two programs, while the device idles, is paid
      once per group (README "Speed": 1.2-1.3x the examples/s of a small MLP on XLA:CPU, 1.1x
      of a small CNN). Results are the same bit for bit. A group never crosses a window: with a step-count
      window it is the largest divisor of iterations_per_loop not above this value, so a call
      compiles at most 2 graphs (full groups, and the last window's rest). The program, and
      the activations alive at once, grow with it. Training always runs one step per
      program: grouped updates measured slower and round differently.
    replay_inference: XLA only (plain PyTorch does not trace). evaluate and predict trace the
      first two groups of steps (inference_steps_per_execution), then run the program they
      compiled on every later group, with no tracing, as TF builds model_fn's graph once
      (replay.py). Only when both groups traced the same graph from the same weights and
      constants, changed no parameter or buffer and drew no random numbers; otherwise it logs
      why and traces every step. Results are the same bit for bit; model_fn's Python code runs
      for the traced groups only. Off by default: it relies on torch_xla internals
      (xla_compat.py), and a model_fn with Python side effects would see fewer calls.
    """

    iterations_per_loop: int | str = 2
    num_shards: int | None = None
    per_host_input_for_training: bool | int | str = True
    strategy: str = "mp"
    max_graphs_per_mode: Mapping[str, int] | None = None
    replica_timeout_secs: float = 1800.0
    experimental_host_call_every_n_steps: int = 1
    param_sharding: str = "replicated"
    num_cores_per_replica: int | None = None
    precision: str = "fp32"
    inference_steps_per_execution: int = 1
    replay_inference: bool = False
    tpu_job_name: dataclasses.InitVar[str | None] = None
    initial_infeed_sleep_secs: dataclasses.InitVar[float | None] = None
    eval_training_input_configuration: dataclasses.InitVar[object] = None

    def __post_init__(self, tpu_job_name: str | None, initial_infeed_sleep_secs: float | None,
                      eval_training_input_configuration: object) -> None:
        _ignored_tf_arguments("TPUConfig", {
            "tpu_job_name": tpu_job_name, "initial_infeed_sleep_secs": initial_infeed_sleep_secs,
            "eval_training_input_configuration": eval_training_input_configuration})
        parse_iterations_per_loop(self.iterations_per_loop)
        require_positive_int("experimental_host_call_every_n_steps",
                             self.experimental_host_call_every_n_steps, optional=False)
        _require(isinstance(self.replica_timeout_secs, (int, float))
                 and not isinstance(self.replica_timeout_secs, bool)
                 and self.replica_timeout_secs > 0,
                 f"replica_timeout_secs must be a positive number of seconds, got "
                 f"{self.replica_timeout_secs!r}")
        require_positive_int("num_shards", self.num_shards)
        mode = self.per_host_input_for_training
        _require(isinstance(mode, bool) or mode in _INPUT_MODES or mode in _INPUT_MODES.values(),
                 f"per_host_input_for_training must be a bool or one of TF's "
                 f"InputPipelineConfig modes {sorted(_INPUT_MODES)}, got {mode!r}")
        _require(
            self.strategy in STRATEGIES,
            f"strategy must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        _require(self.param_sharding in PARAM_SHARDINGS,
                 f"param_sharding must be one of {PARAM_SHARDINGS}, got {self.param_sharding!r}")
        _require(self.precision in PRECISIONS,
                 f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        require_positive_int("num_cores_per_replica", self.num_cores_per_replica)
        require_positive_int("inference_steps_per_execution",
                             self.inference_steps_per_execution, optional=False)
        _require(isinstance(self.replay_inference, bool),
                 f"replay_inference must be a bool, got {self.replay_inference!r}")
        spmd_only = self.param_sharding != "replicated" or (self.num_cores_per_replica or 1) > 1
        _require(not spmd_only or self.strategy == "spmd",
                 "param_sharding and num_cores_per_replica lay parameters over an SPMD mesh: "
                 "set TPUConfig(strategy='spmd')")
        _require((self.num_cores_per_replica or 1) == 1 or self.param_sharding != "replicated",
                 f"num_cores_per_replica={self.num_cores_per_replica} splits each replica over "
                 "several devices: choose param_sharding='fsdp' or 'manual'")
        limits = self.max_graphs_per_mode
        _require(limits is None or isinstance(limits, Mapping),
                 f"max_graphs_per_mode must be a dict of mode -> int, got {limits!r}")
        for mode, limit in (limits or {}).items():
            _require(mode in ModeKeys.ALL,
                     f"max_graphs_per_mode has the key {mode!r}; modes are {ModeKeys.ALL}")
            require_positive_int(f"max_graphs_per_mode[{mode!r}]", limit)

    @property
    def input_mode(self) -> int:
        """per_host_input_for_training as one of TF's InputPipelineConfig values."""
        mode = self.per_host_input_for_training
        if isinstance(mode, bool):
            return InputPipelineConfig.PER_HOST_V1 if mode else InputPipelineConfig.PER_SHARD_V1
        return _INPUT_MODES.get(mode, mode)

    @property
    def per_host_input(self) -> bool:
        """Whether training input is per-host (else per-replica)."""
        return self.input_mode in _PER_HOST_MODES

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
    flat_optimizer: on XLA, a torch Adam or AdamW with plain options is stepped over one flat
      buffer per parameter group (flat_update.py) in a handful of traced ops instead of a chain
      per parameter (about 2x the steps/s of a small model): torch's formula op for op, bit
      for bit plain Adam's numbers; with clipping or AdamW's decay XLA fuses differently, a
      float32 rounding apart per step (README, Speed). What it does not cover (a parameter
      replaced or without a gradient, groups added, parameters shared by two optimizers) it
      hands to torch's own step, exactly, with a log line. False keeps torch's own step.
    """

    clip_global_norm: float | None = None
    accumulation_steps: int = 1
    ema_decay: float | None = None
    ema_for_inference: bool = True
    flat_optimizer: bool = True

    def __post_init__(self) -> None:
        clip = self.clip_global_norm
        _require(clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                  and clip > 0),
                 f"clip_global_norm must be a positive number or None, got {clip!r}")
        require_positive_int("accumulation_steps", self.accumulation_steps)
        _require(self.accumulation_steps is not None,
                 "accumulation_steps must be a positive int, got None")
        decay = self.ema_decay
        _require(decay is None or (isinstance(decay, float) and 0.0 < decay < 1.0),
                 f"ema_decay must be a float in (0, 1) or None, got {decay!r}")
        _require(isinstance(self.ema_for_inference, bool),
                 f"ema_for_inference must be a bool, got {self.ema_for_inference!r}")
        _require(isinstance(self.flat_optimizer, bool),
                 f"flat_optimizer must be a bool, got {self.flat_optimizer!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how often (checkpoints, summaries, logs), the seed, and how
    replicas, input and the update step are set up.

    save_checkpoints_steps / save_checkpoints_secs: a checkpoint at the first window end when
      that many steps, or seconds, have passed since the last one (both may be set: whichever
      comes first), and one at the end of train().
    keep_checkpoint_max: the newest kept; keep_checkpoint_every_n_hours also keeps, for good,
      one checkpoint per that many hours of the run, as TF's Saver does.
    progress: how long calls show their progress (progress.py): "auto" (a bar on a terminal,
      log lines otherwise), "bar", "log" or "off".
    TF arguments that configure graphs and sessions (session_config, cluster, master, ...) are
    accepted so that a ported script runs, with a one-time warning that they are ignored;
    tf_random_seed is TF's name for seed.
    """

    model_dir: str | None = None
    save_checkpoints_steps: int | None = 100
    save_checkpoints_secs: float | None = None
    keep_checkpoint_max: int | None = 5
    keep_checkpoint_every_n_hours: float | None = None
    log_step_count_steps: int | None = 100
    save_summary_steps: int | None = 100
    seed: int = 0
    tpu_config: TPUConfig = dataclasses.field(default_factory=TPUConfig)
    dataset_config: DatasetConfig = dataclasses.field(default_factory=DatasetConfig)
    update_config: UpdateConfig = dataclasses.field(default_factory=UpdateConfig)
    progress: str = "auto"
    tf_random_seed: dataclasses.InitVar[int | None] = None
    session_config: dataclasses.InitVar[object] = None
    cluster: dataclasses.InitVar[object] = None
    master: dataclasses.InitVar[str | None] = None
    evaluation_master: dataclasses.InitVar[str | None] = None
    device_fn: dataclasses.InitVar[object] = None
    protocol: dataclasses.InitVar[str | None] = None
    train_distribute: dataclasses.InitVar[object] = None
    eval_distribute: dataclasses.InitVar[object] = None
    experimental_max_worker_delay_secs: dataclasses.InitVar[float | None] = None
    session_creation_timeout_secs: dataclasses.InitVar[float | None] = None
    checkpoint_save_graph_def: dataclasses.InitVar[bool | None] = None

    def __post_init__(self, tf_random_seed: int | None, session_config: object, cluster: object,
                      master: str | None,
                      evaluation_master: str | None, device_fn: object, protocol: str | None,
                      train_distribute: object, eval_distribute: object,
                      experimental_max_worker_delay_secs: float | None,
                      session_creation_timeout_secs: float | None,
                      checkpoint_save_graph_def: bool | None) -> None:
        _ignored_tf_arguments("RunConfig", {
            "session_config": session_config, "cluster": cluster, "master": master,
            "evaluation_master": evaluation_master, "device_fn": device_fn,
            "protocol": protocol, "train_distribute": train_distribute,
            "eval_distribute": eval_distribute,
            "experimental_max_worker_delay_secs": experimental_max_worker_delay_secs,
            "session_creation_timeout_secs": session_creation_timeout_secs,
            "checkpoint_save_graph_def": checkpoint_save_graph_def})
        if tf_random_seed is not None:  # TF's name for the seed
            _require(self.seed in (0, tf_random_seed),
                     f"seed={self.seed} and tf_random_seed={tf_random_seed} differ; give one")
            object.__setattr__(self, "seed", tf_random_seed)
        _require(
            self.model_dir is None or isinstance(self.model_dir, str),
            f"model_dir must be a str or None, got {self.model_dir!r}",
        )
        for name in ("save_checkpoints_steps", "keep_checkpoint_max", "log_step_count_steps",
                     "save_summary_steps"):
            require_positive_int(name, getattr(self, name))
        for name in ("save_checkpoints_secs", "keep_checkpoint_every_n_hours"):
            value = getattr(self, name)
            _require(value is None or (isinstance(value, (int, float))
                                       and not isinstance(value, bool) and value > 0),
                     f"{name} must be a positive number or None, got {value!r}")
        _require(  # torch and torch_xla take unsigned 64-bit seeds
            isinstance(self.seed, int) and not isinstance(self.seed, bool)
            and 0 <= self.seed < 2**64,
            f"seed must be an int in [0, 2**64), got {self.seed!r}",
        )
        _require(
            isinstance(self.tpu_config, TPUConfig),
            f"tpu_config must be a TPUConfig, got {type(self.tpu_config).__name__}",
        )
        _require(
            isinstance(self.dataset_config, DatasetConfig),
            f"dataset_config must be a DatasetConfig, got {type(self.dataset_config).__name__}",
        )
        _require(self.progress in PROGRESS_STYLES,
                 f"progress must be one of {PROGRESS_STYLES}, got {self.progress!r}")
        _require(
            isinstance(self.update_config, UpdateConfig),
            f"update_config must be an UpdateConfig, got {type(self.update_config).__name__}",
        )

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)
