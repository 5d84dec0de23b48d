"""What a run was: its params and whole RunConfig, kept in model_dir and in TensorBoard.

`run.json` is written when a model_dir's first train writes its first checkpoint (by the
chief, atomically) and left as it is after: it records how the run began; a later train() with
other params or config logs the difference. Each evaluate adds the params and its metrics to
TensorBoard's HPARAMS view (in `eval/hparams`), as Lightning does, so runs can be compared by
their hyperparameters.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from tensorboardX.summary import hparams as hparams_summaries

from ..api.hooks import Hook, RunContext
from ..api.job import Job
from ..common.version import __version__
from ..state.stores import store_for
from .summary import open_writer

logger = logging.getLogger("torch_tpu_estimator")

RECORD_NAME = "run.json"


def _plain(value: Any) -> Any:
    """A value as JSON can hold it: containers kept, anything else by its repr."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return repr(value)


def describe(job: Job, topology_name: str) -> dict[str, Any]:
    """The run's params, RunConfig and batch sizes, in plain JSON values."""
    return {"params": _plain(dict(job.params)),
            "config": _plain(dataclasses.asdict(job.config)),
            "batch_sizes": _plain(dict(job.batch_sizes)), "runtime": topology_name,
            "versions": {"torch_tpu_estimator": __version__, "torch": torch.__version__,
                         "torch_xla": _installed_version("torch_xla")}}


def _installed_version(distribution: str) -> str | None:
    """A distribution's version from its metadata, without importing it; None if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


class RunRecordHook(Hook):
    """Writes run.json once training has written its first checkpoint, so a call refused for
    bad input leaves nothing in model_dir; a later train() logs what it changed."""

    def __init__(self, job: Job, topology_name: str):
        self.job, self.topology_name, self.done = job, topology_name, False

    def after_save(self, context: RunContext, path: str) -> None:
        if not self.done:
            self.done = True
            record_run(self.job, self.topology_name)


def record_run(job: Job, topology_name: str) -> None:
    """Writes run.json at a model_dir's first train; later, logs what changed."""
    store = store_for(job.model_dir)
    path = store.join(job.model_dir, RECORD_NAME)
    record = describe(job, topology_name)
    if not store.exists(path):
        store.publish(path, json.dumps(record, indent=1, sort_keys=True).encode())
        return
    try:
        first = json.loads(store.read_bytes(path))
    except (OSError, ValueError):
        return
    changed = sorted(key for key in ("params", "config", "batch_sizes")
                     if first.get(key) != record[key])
    if changed:
        logger.info("this train() runs with other %s than %s records (the run's first)",
                    " and ".join(changed), path)


def write_hparams(eval_directory: str, params: Mapping[str, Any],
                  results: Mapping[str, float]) -> None:
    """The params (numbers, strings and bools) with an evaluation's metrics, for TensorBoard's
    HPARAMS view, in `<eval_directory>/hparams` (a new event file per evaluation)."""
    hparams = {key: value for key, value in params.items()
               if isinstance(value, (int, float, str, bool))}
    metrics = {f"hparam/{key}": float(value) for key, value in results.items()
               if key != "global_step"}
    step = int(results["global_step"])
    with open_writer(os.path.join(eval_directory, "hparams")) as writer:
        for summary in hparams_summaries(hparams, metrics):
            writer.file_writer.add_summary(summary, step)
        for name, value in metrics.items():
            writer.add_scalar(name, value, step)
