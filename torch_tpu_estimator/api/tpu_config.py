"""TPUConfig: how replicas run, and TF's InputPipelineConfig names.

The runtime, the mesh, windows of steps, the input layout, the recompilation guard.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from .checks import require, require_positive_int, warn_ignored_tf_arguments
from .spec import ModeKeys

STRATEGIES = ("mp", "spmd")
PARAM_SHARDINGS = ("replicated", "fsdp", "manual")
PRECISIONS = ("fp32", "bf16")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h)\s*$")
_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_iterations_per_loop(value: int | str) -> tuple[int | None, float | None]:
    """Returns (steps, seconds): a window of a fixed step count, or a time budget like "30s"."""
    if isinstance(value, int) and not isinstance(value, bool):
        require(value > 0, f"iterations_per_loop must be a positive int, got {value}")
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
    """TF's names for where input_fn runs in training (TPUConfig.per_host_input_for_training).

    With TF's values, so that ported code reads as it did. How each maps onto this project's
    two layouts is in TPUConfig.
    """

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
class TPUConfig:
    """How replicas run.

    Attributes:
        iterations_per_loop: steps run on the device between two visits of the host (hooks, logs,
            summaries, checkpoints); an int, or a time budget such as "30s".
        num_shards: number of replicas. With use_tpu: None means every local device, and any other
            value must match it. With use_tpu=False: None is one process (or torchrun's WORLD_SIZE); N
            > 1 makes the estimator launch N CPU processes joined by gloo.
        per_host_input_for_training: where input_fn runs in training, as a bool or by TF's names
            (InputPipelineConfig). Per-host (True, PER_HOST_V1, and BROADCAST and SLICED, which
            deliver the same batches when input_fn is deterministic): input_fn is called once per
            process with the global batch, and each replica keeps its rows of every batch. Per-replica
            (False, PER_SHARD_V1, and PER_HOST_V2 where a host drives one replica): input_fn is called
            once per replica with the per-replica batch and `params["context"]` naming the shard it
            must read. PER_HOST_V2 on an SPMD mesh (one process, several replicas) is refused: use
            PER_HOST_V1 or PER_SHARD_V1. Eval and predict always read per-host input.
        experimental_host_call_every_n_steps: the TRAIN spec's host_call runs for every n-th step only
            (its tensors are kept and read back for those steps alone). With n > 1 the steps that keep
            them trace a graph of their own: one more compiled graph in training.
        param_sharding: SPMD only; how parameters lie over the mesh. "replicated": every device holds
            the whole model (data parallel). "fsdp": fully sharded data parallel (torch_xla's FSDPv2):
            each parameter is split over the "fsdp" axis, gathered for the step. "manual": the user's
            own xs.mark_sharding annotations, in model_init_fn or model_fn, on the mesh found as
            params["context"].mesh.
        num_cores_per_replica: SPMD only; devices per model replica (TF's name): a 2-D mesh of
            (devices / k) x k. With "fsdp" its axes are ("data", "fsdp"), each parameter split over k
            devices and replicated over "data"; with "manual", ("data", "model"). The batch is split
            over every device (fsdp) or over "data" (manual).
        precision: "bf16" runs model_fn under torch.autocast in bfloat16 (XLA, CPU or CUDA alike),
            with float32 weights and optimizer state; "fp32" (the default) does not.
        strategy: XLA only. "mp" runs one process per device (xmp.spawn); "spmd" runs one process over
            a mesh of every local device (GSPMD), where model_fn sees the global batch.
        max_graphs_per_mode: XLA only. {mode: n} allows at most n different traced step graphs in that
            mode (ModeKeys.TRAIN "train", EVAL "eval", PREDICT "infer") per call of train, evaluate or
            predict; one more is a RecompilationError naming the mode, raised as the graph is traced
            (torch_xla.compile's max_different_graphs). Training with Adam-like optimizers traces 2
            (the first step creates their state); eval and predict trace 1, or 2 with
            inference_steps_per_execution > 1 (full groups, and the last window's rest).
        replica_timeout_secs: how long replicas wait for one another. Processes the estimator launches
            (use_tpu=False, num_shards=N) are watched: when none of them makes progress for this long,
            the job ends with ReplicaHungError naming the replica the others wait for, and every
            process is stopped. Under torchrun it is the process group's collective timeout. It must
            exceed the longest pause of one replica: a compilation, a checkpoint write.
        inference_steps_per_execution: evaluate and predict trace up to this many steps into one XLA
            program (Keras' steps_per_execution; TF's TPUEstimator runs a window's steps per
            session.run), so the host's work between two programs, while the device idles, is paid
            once per group (docs, Benchmarks: 1.2-1.3x the examples/s of a small MLP on XLA:CPU, 1.1x of
            a small CNN). Results are the same bit for bit. A group never crosses a window: with a
            step-count window it is the largest divisor of iterations_per_loop not above this value,
            so a call compiles at most 2 graphs (full groups, and the last window's rest). The
            program, and the activations alive at once, grow with it. Training always runs one step
            per program: grouped updates measured slower and round differently.
        replay_inference: XLA only (plain PyTorch does not trace). evaluate and predict trace the
            first two groups of steps (inference_steps_per_execution), then run the program they
            compiled on every later group, with no tracing, as TF builds model_fn's graph once
            (replay.py). Only when both groups traced the same graph from the same weights and
            constants, changed no parameter or buffer and drew no random numbers; otherwise it logs
            why and traces every step. Results are the same bit for bit; model_fn's Python code runs
            for the traced groups only. Off by default: it relies on torch_xla internals
            (xla_compat.py), and a model_fn with Python side effects would see fewer calls.
        replay_training: XLA only. Training traces its first steps, each run by the program it
            compiled, then replays that program on every later step of the same kind, with no tracing,
            as TF's device loop runs the step it built (step/train_replay.py). The batch, the
            optimizer's per-step numbers (learning rates, bias corrections), the RNG seed and the
            carried tensors (parameters, buffers, optimizer state, EMA) are the program's inputs.
            Covers the built-in update with torch's SGD, Adam and AdamW; otherwise (model_fn in charge
            of the update, a host read, a value that changes unseen) it logs why and traces every
            step. model_fn's Python code runs for the traced steps only.
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
    replay_training: bool = False
    tpu_job_name: dataclasses.InitVar[str | None] = None
    initial_infeed_sleep_secs: dataclasses.InitVar[float | None] = None
    eval_training_input_configuration: dataclasses.InitVar[object] = None

    def __post_init__(self, tpu_job_name: str | None, initial_infeed_sleep_secs: float | None,
                      eval_training_input_configuration: object) -> None:
        warn_ignored_tf_arguments("TPUConfig", {
            "tpu_job_name": tpu_job_name, "initial_infeed_sleep_secs": initial_infeed_sleep_secs,
            "eval_training_input_configuration": eval_training_input_configuration})
        parse_iterations_per_loop(self.iterations_per_loop)
        require_positive_int("experimental_host_call_every_n_steps",
                             self.experimental_host_call_every_n_steps, optional=False)
        require(isinstance(self.replica_timeout_secs, (int, float))
                 and not isinstance(self.replica_timeout_secs, bool)
                 and self.replica_timeout_secs > 0,
                 f"replica_timeout_secs must be a positive number of seconds, got "
                 f"{self.replica_timeout_secs!r}")
        require_positive_int("num_shards", self.num_shards)
        mode = self.per_host_input_for_training
        require(isinstance(mode, bool) or mode in _INPUT_MODES or mode in _INPUT_MODES.values(),
                 f"per_host_input_for_training must be a bool or one of TF's "
                 f"InputPipelineConfig modes {sorted(_INPUT_MODES)}, got {mode!r}")
        require(
            self.strategy in STRATEGIES,
            f"strategy must be one of {STRATEGIES}, got {self.strategy!r}",
        )
        require(self.param_sharding in PARAM_SHARDINGS,
                 f"param_sharding must be one of {PARAM_SHARDINGS}, got {self.param_sharding!r}")
        require(self.precision in PRECISIONS,
                 f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        require_positive_int("num_cores_per_replica", self.num_cores_per_replica)
        require_positive_int("inference_steps_per_execution",
                             self.inference_steps_per_execution, optional=False)
        for name in ("replay_inference", "replay_training"):
            require(isinstance(getattr(self, name), bool),
                     f"{name} must be a bool, got {getattr(self, name)!r}")
        spmd_only = self.param_sharding != "replicated" or (self.num_cores_per_replica or 1) > 1
        require(not spmd_only or self.strategy == "spmd",
                 "param_sharding and num_cores_per_replica lay parameters over an SPMD mesh: "
                 "set TPUConfig(strategy='spmd')")
        require((self.num_cores_per_replica or 1) == 1 or self.param_sharding != "replicated",
                 f"num_cores_per_replica={self.num_cores_per_replica} splits each replica over "
                 "several devices: choose param_sharding='fsdp' or 'manual'")
        limits = self.max_graphs_per_mode
        require(limits is None or isinstance(limits, Mapping),
                 f"max_graphs_per_mode must be a dict of mode -> int, got {limits!r}")
        for mode, limit in (limits or {}).items():
            require(mode in ModeKeys.ALL,
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

    def require_input_fits(self, num_replicas: int, one_program: bool) -> None:
        """Raises ValueError when these replicas cannot honour the training input layout.

        That is PER_HOST_V2 on an SPMD mesh (one program for several replicas).
        """
        if self.input_mode == InputPipelineConfig.PER_HOST_V2 and one_program and \
                num_replicas > 1:
            raise ValueError(
                f"per_host_input_for_training=PER_HOST_V2 cannot be honoured on an SPMD mesh of "
                f"{num_replicas} devices: it would call input_fn once for several replicas with "
                "one replica's batch. Use PER_HOST_V1 (True: one call with the global batch) or "
                "PER_SHARD_V1 (False: one call per replica)")

    def max_graphs(self, mode: str) -> int | None:
        """The most different step graphs `mode` may trace, or None for no limit."""
        return (self.max_graphs_per_mode or {}).get(mode)


