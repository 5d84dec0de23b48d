"""Checkpoint files in model_dir: atomic writes, an index of the kept ones, retention, reading.

A checkpoint is `model.ckpt-<global_step>.pt`, a `torch.save` of plain tensors and Python values,
written to a temporary name, flushed to disk, then renamed, so a crash never leaves a half file
under a checkpoint's name. `checkpoint.json` lists the kept checkpoints, newest last; it is
rewritten the same way, after the checkpoint it names is complete, with each checkpoint's
SHA-256: a checkpoint damaged later (truncated by a full disk, changed by hand) is reported by
name and skipped for the previous one, and the next save moves it aside as `<name>.damaged`
(never deleted, never overwritten).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger("torch_tpu_estimator")

INDEX_NAME = "checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^model\.ckpt-(\d+)\.pt$")
_TEMP_PREFIX = ".tmp-checkpoint-"


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


def _read_index(model_dir: str) -> dict[str, str | None]:
    """The kept checkpoints, oldest first, each with the SHA-256 recorded when it was written
    (None in an index written before digests were recorded)."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    try:
        with open(index_path) as handle:
            index = json.load(handle)
        digests = index.get("sha256", {})
        entries = {name: digests.get(name) for name in index["checkpoints"]}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"{index_path} is not a checkpoint index: {error}") from error
    return {name: digest for name, digest in entries.items()
            if os.path.exists(os.path.join(model_dir, name))}


def _write_index(model_dir: str, index: dict[str, str | None]) -> None:
    names = list(index)
    text = json.dumps({"latest": names[-1] if names else None, "checkpoints": names,
                       "sha256": index}, indent=1)
    atomic_write(os.path.join(model_dir, INDEX_NAME), lambda handle: handle.write(text.encode()))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# Files whose digest matched, by identity and change time: hashed once per process.
_VERIFIED: set[tuple] = set()


def damage(path: str, digest: str | None) -> str | None:
    """Why the checkpoint file at `path` cannot be trusted, or None when it is whole: it is
    gone, its SHA-256 differs from the one recorded when it was written, or (with no record)
    it is not a complete torch.save archive."""
    try:
        key = _identity(path, digest)
    except FileNotFoundError:  # removed by retention since the index was read
        return "it no longer exists"
    if key in _VERIFIED:
        return None
    if digest is not None and _sha256(path) != digest:
        return "its SHA-256 differs from the one recorded when it was written"
    if digest is None and not zipfile.is_zipfile(path):
        return "it is not a complete torch.save archive"
    _VERIFIED.add(key)
    return None


def _identity(path: str, digest: str | None) -> tuple:
    """A file as _VERIFIED knows it: any rewrite changes its inode, size or change time."""
    stat = os.stat(path)
    return (path, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, digest)


def latest_checkpoint(model_dir: str | None) -> str | None:
    """Path of the newest intact checkpoint in model_dir, or None when it has none.

    A damaged newer one (truncated, or changed since it was written) is reported by name and
    skipped: a run resumes from the previous good checkpoint. When every checkpoint the index
    lists is damaged, that is an error, not a fresh start.
    """
    if not model_dir or not os.path.isdir(model_dir):
        return None
    index = _read_index(model_dir)
    for name, digest in reversed(index.items()):
        path = os.path.join(model_dir, name)
        problem = damage(path, digest)
        if problem is None:
            return path
        logger.warning("Checkpoint %s is damaged (%s): it is skipped and left in place; the "
                       "previous checkpoint is used", path, problem)
    if index:
        raise ValueError(
            f"every checkpoint listed in {os.path.join(model_dir, INDEX_NAME)} is damaged "
            f"({', '.join(index)}): nothing to resume from. Move them out of model_dir to "
            "start afresh, or restore them from a backup")
    return None


def _remove_stale_temporaries(model_dir: str) -> None:
    """Half-written files of a checkpoint writer that was killed (the chief is the only one)."""
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name.startswith(_TEMP_PREFIX) and os.path.isfile(path):
            os.remove(path)
            logger.info("Removed %s, left by an interrupted checkpoint write", name)


def _set_aside_damaged(model_dir: str, index: dict[str, str | None]) -> dict[str, str | None]:
    """Renames the damaged checkpoints of the index to `<name>.damaged` (kept, out of the way of
    new checkpoints of the same step and of retention) and returns the index without them."""
    intact = {}
    for name, digest in index.items():
        problem = damage(os.path.join(model_dir, name), digest)
        if problem is None:
            intact[name] = digest
        elif problem != "it no longer exists":
            os.replace(os.path.join(model_dir, name), os.path.join(model_dir, f"{name}.damaged"))
            logger.warning("Moved the damaged checkpoint %s (%s) to %s.damaged", name, problem,
                           name)
    return intact


def save_checkpoint(model_dir: str, state: dict, keep_checkpoint_max: int | None) -> str:
    """Writes `state` as the checkpoint of state["global_step"] and keeps the newest ones."""
    os.makedirs(model_dir, exist_ok=True)
    _remove_stale_temporaries(model_dir)
    index = _set_aside_damaged(model_dir, _read_index(model_dir))
    name = checkpoint_name(state["global_step"])
    path = os.path.join(model_dir, name)
    atomic_write(path, lambda handle: torch.save(state, handle))
    index = {existing: digest for existing, digest in index.items() if existing != name}
    index[name] = _sha256(path)
    _VERIFIED.add(_identity(path, index[name]))  # just hashed: the next save need not again
    names = list(index)
    kept = names[-keep_checkpoint_max:] if keep_checkpoint_max else names
    _write_index(model_dir, {kept_name: index[kept_name] for kept_name in kept})
    for old in names[: len(names) - len(kept)]:
        os.remove(os.path.join(model_dir, old))
    logger.info("Saved checkpoint for step %d into %s", state["global_step"], path)
    return path


def load_checkpoint(path: str) -> dict:
    """Reads a checkpoint into CPU memory."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"checkpoint {path!r} cannot be read (truncated, corrupt or not "
                         f"readable): {error}") from error


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint file, or the latest checkpoint of a model_dir, as a file path."""
    if os.path.isdir(path):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"directory {path!r} holds no checkpoint")
        return latest
    return path
