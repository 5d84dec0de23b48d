"""Run configuration: where a run writes, how often it saves, its seed, and the other configs.

The configs of input batching (DatasetConfig), replicas (TPUConfig, tpu_config.py) and the
update step (UpdateConfig).

Plain dataclasses that validate themselves on construction, so a bad value fails at the line that
made it, long before any device work.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .checks import require, require_positive_int, warn_ignored_tf_arguments
from .tpu_config import InputPipelineConfig, TPUConfig

__all__ = ["DatasetConfig", "InputPipelineConfig", "RunConfig", "TPUConfig", "UpdateConfig"]

PROGRESS_STYLES = ("auto", "bar", "log", "off")


@dataclasses.dataclass(frozen=True)
class DatasetConfig:
    """How the estimator batches what input_fn returns.

    Attributes:
        shuffle: reshuffle a map-style Dataset's training examples every pass, seeded by
            `RunConfig.seed` and the pass number, so a resumed run sees the same order. Eval and
            predict never shuffle.
        num_workers: DataLoader worker processes for that batching.
        num_epochs: passes over the training data, counted since the model_dir's first step (as
            max_steps counts steps): training ends after that many, or at the step limit if one comes
            first. None repeats the data until the step limit; with no step limit either
            (train(input_fn) alone), each train() call reads to the end of one pass, as TF's Estimator
            does with a Dataset that is not repeated.
    """

    shuffle: bool = True
    num_workers: int = 0
    num_epochs: int | None = None

    def __post_init__(self) -> None:
        require(isinstance(self.shuffle, bool), f"shuffle must be a bool, got {self.shuffle!r}")
        require(
            isinstance(self.num_workers, int) and not isinstance(self.num_workers, bool)
            and self.num_workers >= 0,
            f"num_workers must be an int >= 0, got {self.num_workers!r}",
        )
        require_positive_int("num_epochs", self.num_epochs)


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
    """How the estimator's training update is built (update.py).

    Attributes:
        clip_global_norm: clips the gradients of each optimizer's parameters to this global L2 norm,
            after they are averaged over replicas (tf.clip_by_global_norm).
        accumulation_steps: k > 1 splits every global batch into k micro-batches, runs model_fn and
            backward on each inside one compiled step, and updates once with their mean gradient: the
            update of one batch of train_batch_size, in k times less activation memory.
            train_batch_size must divide by k times the replica count.
        ema_decay: keeps an exponential moving average of the weights, updated after every step (ema =
            decay * ema + (1 - decay) * weights) and stored in checkpoints.
        ema_for_inference: evaluate, predict and export use the averaged weights when ema_decay is
            set.
        flat_optimizer: on XLA, a torch Adam or AdamW with plain options is stepped over one flat
            buffer per parameter group (flat_update.py) in a handful of traced ops instead of a chain
            per parameter (about 2x the steps/s of a small model), wherever that gives torch's own
            Adam bit for bit: gradients straight from the built-in update (or update.step,
            update.minimize), no clip_global_norm or accumulation_steps, no AdamW decay, no step
            or gradient hooks. Everything else (clipping, accumulation, AdamW's decay, gradients
            model_fn hands to update.apply or an optimizer.step() in model_fn, hooks, a parameter
            replaced or without a gradient, groups added, parameters shared by two optimizers)
            takes torch's own step, with a log line saying why. False keeps torch's own step
            always.
    """

    clip_global_norm: float | None = None
    accumulation_steps: int = 1
    ema_decay: float | None = None
    ema_for_inference: bool = True
    flat_optimizer: bool = True

    def __post_init__(self) -> None:
        clip = self.clip_global_norm
        require(clip is None or (isinstance(clip, (int, float)) and not isinstance(clip, bool)
                                  and clip > 0),
                 f"clip_global_norm must be a positive number or None, got {clip!r}")
        require_positive_int("accumulation_steps", self.accumulation_steps)
        require(self.accumulation_steps is not None,
                 "accumulation_steps must be a positive int, got None")
        decay = self.ema_decay
        require(decay is None or (isinstance(decay, float) and 0.0 < decay < 1.0),
                 f"ema_decay must be a float in (0, 1) or None, got {decay!r}")
        require(isinstance(self.ema_for_inference, bool),
                 f"ema_for_inference must be a bool, got {self.ema_for_inference!r}")
        require(isinstance(self.flat_optimizer, bool),
                 f"flat_optimizer must be a bool, got {self.flat_optimizer!r}")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how often, its seed, and how replicas, input and update are set up.

    TF arguments that configure graphs and sessions (session_config, cluster, master, ...) are
    accepted so that a ported script runs, with a one-time warning that they are ignored;
    tf_random_seed is TF's name for seed.

    Attributes:
        model_dir: where checkpoints, event files and run.json go: a local folder or an fsspec URL
            (`gs://...`, `s3://...`). None: the estimator's own, or a new temporary folder.
        save_checkpoints_steps: a checkpoint at the first window end once this many steps have passed
            since the last one, and one at the end of train(). None: by time only, or at the end only.
        save_checkpoints_secs: a checkpoint at the first window end once this many seconds have passed
            since the last one (with save_checkpoints_steps, whichever comes first).
        keep_checkpoint_max: how many of the newest checkpoints are kept (None: all).
        keep_checkpoint_every_n_hours: also keeps, for good, one checkpoint per this many hours of the
            run, as TF's Saver does.
        log_step_count_steps: logs the loss and steps/s every this many steps (None: never).
        save_summary_steps: writes the training scalars to TensorBoard every this many steps (None:
            never).
        seed: seeds the model's initialization, dropout and the input's draws from the host's
            global generators (Python, NumPy, torch; docs: Input), so that a run and its
            resumption draw the same numbers.
        tpu_config: how replicas run (TPUConfig).
        dataset_config: how input_fn's examples are batched (DatasetConfig).
        update_config: how the training update is built (UpdateConfig).
        progress: how calls show their progress: "auto" (a bar on a terminal, log lines otherwise),
            "bar", "log" or "off".
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
        warn_ignored_tf_arguments("RunConfig", {
            "session_config": session_config, "cluster": cluster, "master": master,
            "evaluation_master": evaluation_master, "device_fn": device_fn,
            "protocol": protocol, "train_distribute": train_distribute,
            "eval_distribute": eval_distribute,
            "experimental_max_worker_delay_secs": experimental_max_worker_delay_secs,
            "session_creation_timeout_secs": session_creation_timeout_secs,
            "checkpoint_save_graph_def": checkpoint_save_graph_def})
        if tf_random_seed is not None:  # TF's name for the seed
            require(self.seed in (0, tf_random_seed),
                     f"seed={self.seed} and tf_random_seed={tf_random_seed} differ; give one")
            object.__setattr__(self, "seed", tf_random_seed)
        require(
            self.model_dir is None or isinstance(self.model_dir, str),
            f"model_dir must be a str or None, got {self.model_dir!r}",
        )
        for name in ("save_checkpoints_steps", "keep_checkpoint_max", "log_step_count_steps",
                     "save_summary_steps"):
            require_positive_int(name, getattr(self, name))
        for name in ("save_checkpoints_secs", "keep_checkpoint_every_n_hours"):
            value = getattr(self, name)
            require(value is None or (isinstance(value, (int, float))
                                       and not isinstance(value, bool) and value > 0),
                     f"{name} must be a positive number or None, got {value!r}")
        require(  # torch and torch_xla take unsigned 64-bit seeds
            isinstance(self.seed, int) and not isinstance(self.seed, bool)
            and 0 <= self.seed < 2**64,
            f"seed must be an int in [0, 2**64), got {self.seed!r}",
        )
        require(
            isinstance(self.tpu_config, TPUConfig),
            f"tpu_config must be a TPUConfig, got {type(self.tpu_config).__name__}",
        )
        require(
            isinstance(self.dataset_config, DatasetConfig),
            f"dataset_config must be a DatasetConfig, got {type(self.dataset_config).__name__}",
        )
        require(self.progress in PROGRESS_STYLES,
                 f"progress must be one of {PROGRESS_STYLES}, got {self.progress!r}")
        require(
            isinstance(self.update_config, UpdateConfig),
            f"update_config must be an UpdateConfig, got {type(self.update_config).__name__}",
        )

    def replace(self, **changes: Any) -> RunConfig:
        """A copy with `changes` applied (checked again)."""
        return dataclasses.replace(self, **changes)
