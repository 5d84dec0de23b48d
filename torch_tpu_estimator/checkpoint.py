"""Checkpoint files in model_dir: atomic writes, an index of the kept ones, retention, reading.

A checkpoint is `model.ckpt-<global_step>.pt`, a `torch.save` of plain tensors and Python values,
written to a temporary name, flushed to disk, then renamed, so a crash never leaves a half file
under a checkpoint's name. `checkpoint.json` lists the kept checkpoints, newest last; it is
rewritten the same way, after the checkpoint it names is complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("torch_tpu_estimator")

INDEX_NAME = "checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^model\.ckpt-(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-"


def checkpoint_name(global_step: int) -> str:
    return f"model.ckpt-{global_step}.pt"


def step_of(path: str) -> int:
    """The global step a checkpoint file was written at, from its name."""
    match = _CHECKPOINT_NAME.match(os.path.basename(path))
    if not match:
        raise ValueError(f"{path!r} is not a checkpoint file name (model.ckpt-<step>.pt)")
    return int(match.group(1))


def fsync_path(path: str) -> None:
    """Flushes a file's or a directory's contents (for a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Calls write(file) on a temporary file beside `path`, then renames it to `path`."""
    directory = os.path.dirname(path) or "."
    fd, temp_path = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    fsync_path(directory)


def _read_index(model_dir: str) -> list[str]:
    try:
        with open(os.path.join(model_dir, INDEX_NAME)) as handle:
            names = json.load(handle)["checkpoints"]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError) as error:
        index = os.path.join(model_dir, INDEX_NAME)
        raise ValueError(f"{index} is not a checkpoint index: {error}") from error
    return [name for name in names if os.path.exists(os.path.join(model_dir, name))]


def _write_index(model_dir: str, names: list[str]) -> None:
    text = json.dumps({"latest": names[-1] if names else None, "checkpoints": names}, indent=1)
    atomic_write(os.path.join(model_dir, INDEX_NAME), lambda handle: handle.write(text.encode()))


def all_checkpoints(model_dir: str | None) -> list[str]:
    """Paths of the kept checkpoints, oldest first."""
    if not model_dir or not os.path.isdir(model_dir):
        return []
    return [os.path.join(model_dir, name) for name in _read_index(model_dir)]


def latest_checkpoint(model_dir: str | None) -> str | None:
    """Path of the newest checkpoint in model_dir, or None."""
    paths = all_checkpoints(model_dir)
    return paths[-1] if paths else None


def save_checkpoint(model_dir: str, state: dict, keep_checkpoint_max: int | None) -> str:
    """Writes `state` as the checkpoint of state["global_step"] and keeps the newest ones."""
    os.makedirs(model_dir, exist_ok=True)
    name = checkpoint_name(state["global_step"])
    path = os.path.join(model_dir, name)
    atomic_write(path, lambda handle: torch.save(state, handle))
    names = [existing for existing in _read_index(model_dir) if existing != name] + [name]
    kept = names[-keep_checkpoint_max:] if keep_checkpoint_max else names
    _write_index(model_dir, kept)
    for old in names[: len(names) - len(kept)]:
        os.remove(os.path.join(model_dir, old))
    logger.info("Saved checkpoint for step %d into %s", state["global_step"], path)
    return path


def load_checkpoint(path: str) -> dict:
    """Reads a checkpoint into CPU memory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    return torch.load(path, map_location="cpu", weights_only=True)


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint file, or the latest checkpoint of a model_dir, as a file path."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"directory {path!r} holds no checkpoint")
        return latest
    return path
