"""Checkpoints in model_dir: an index of the kept ones, publishing, retention, damage.

A checkpoint is `model.ckpt-<global_step>.pt`, one file, or `model.ckpt-<global_step>/`, a
directory when its tensors are sharded (storage.py decides and writes), written under a
temporary name, flushed to disk, then renamed, so a crash never leaves half of one under a
checkpoint's name. `checkpoint.json` lists the kept checkpoints, newest last; it is
rewritten the same way, after the checkpoint it names is complete, with each checkpoint's
SHA-256: a checkpoint damaged later (truncated by a full disk, changed by hand) is reported by
name and skipped for the previous one, and the next save moves it aside as `<name>.damaged`
(never deleted, never overwritten).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import re
import shutil
import time
import zipfile
from collections.abc import Callable
from typing import Any

from ..common.paths import plain_name
from . import storage
from .files import TEMP_PREFIX, atomic_write, sha256

logger = logging.getLogger("torch_tpu_estimator")

INDEX_NAME = "checkpoint.json"
_CHECKPOINT_NAME = re.compile(r"^model\.ckpt-(\d+)(\.pt)?$")  # a file, or a sharded directory
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def checkpoint_name(global_step: int, sharded: bool = False) -> str:
    """`model.ckpt-<step>.pt` (one file), or `model.ckpt-<step>` (a sharded checkpoint's
    directory)."""
    return f"model.ckpt-{global_step}" + ("" if sharded else ".pt")


def step_of(path: str) -> int:
    """The global step a checkpoint file was written at, from its name."""
    match = _CHECKPOINT_NAME.match(os.path.basename(path))
    if not match:
        raise ValueError(f"{path!r} is not a checkpoint file name (model.ckpt-<step>.pt)")
    return int(match.group(1))


@dataclasses.dataclass
class Index:
    """What checkpoint.json says of the kept checkpoints.

    digests: name -> SHA-256 recorded when written (None in an index older than digests),
      oldest first. written: name -> unix time it was written. preserved: the names kept for
      good by keep_checkpoint_every_n_hours (retention skips them). hours_anchor: the time the
      next such checkpoint is counted from.
    """

    digests: dict[str, str | None] = dataclasses.field(default_factory=dict)
    written: dict[str, float] = dataclasses.field(default_factory=dict)
    preserved: list[str] = dataclasses.field(default_factory=list)
    hours_anchor: float | None = None

    def to_json(self) -> str:
        names = list(self.digests)
        return json.dumps({"latest": names[-1] if names else None, "checkpoints": names,
                           "sha256": self.digests, "written": self.written,
                           "preserved": self.preserved, "hours_anchor": self.hours_anchor},
                          indent=1)

    def drop(self, name: str) -> None:
        del self.digests[name]
        self.written.pop(name, None)
        if name in self.preserved:
            self.preserved.remove(name)


def _checked_index(index: Any, index_path: str) -> Index:
    """The index after checking every name (a checkpoint file name inside model_dir, never a
    path that leads elsewhere), every digest (a SHA-256 hex string or none) and every time."""
    if not isinstance(index, dict) or not isinstance(index.get("checkpoints"), list):
        raise ValueError(f"{index_path} is not a checkpoint index: no list 'checkpoints'")
    digests = index.get("sha256", {})
    written = index.get("written", {})
    preserved = index.get("preserved", [])
    anchor = index.get("hours_anchor")
    if not isinstance(digests, dict) or not isinstance(written, dict) or \
            not isinstance(preserved, list) or not (anchor is None or _is_time(anchor)):
        raise ValueError(f"{index_path} is not a checkpoint index: 'sha256', 'written', "
                         "'preserved' or 'hours_anchor' has the wrong type")
    checked = Index(hours_anchor=anchor)
    for name in index["checkpoints"]:
        plain_name(name, f"checkpoint index {index_path}")
        if not _CHECKPOINT_NAME.match(name):
            raise ValueError(f"checkpoint index {index_path} names {name!r}, which is not a "
                             "checkpoint file name (model.ckpt-<step>.pt): refused, nothing "
                             "was touched")
        digest = digests.get(name)
        if digest is not None and not (isinstance(digest, str) and _SHA256.match(digest)):
            raise ValueError(f"checkpoint index {index_path} gives {name!r} the digest "
                             f"{digest!r}, which is not a SHA-256")
        checked.digests[name] = digest
        if _is_time(written.get(name)):
            checked.written[name] = written[name]
    checked.preserved = [name for name in preserved if name in checked.digests]
    return checked


def _is_time(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def read_index(model_dir: str) -> Index:
    """The index of the checkpoints of model_dir that still exist (empty without an index)."""
    index_path = os.path.join(model_dir, INDEX_NAME)
    try:
        with open(index_path) as handle:
            index = _checked_index(json.load(handle), index_path)
    except FileNotFoundError:
        return Index()
    except ValueError as error:
        if "checkpoint index" in str(error):
            raise
        raise ValueError(f"{index_path} is not a checkpoint index: {error}") from error
    for name in [name for name in index.digests
                 if not os.path.exists(os.path.join(model_dir, name))]:
        index.drop(name)
    return index


def now() -> float:
    """The wall clock checkpoints are timed by (tests replace it)."""
    return time.time()


def retain(index: Index, keep_max: int | None, every_n_hours: float | None) -> list[str]:
    """Applies retention to `index` (newest last); returns the names to delete. The newest
    `keep_max` are kept (None: all); of the older ones, each written at least `every_n_hours`
    after the last one kept that way is kept for good, as TF's Saver does."""
    candidates = [name for name in index.digests if name not in index.preserved]
    surplus = candidates[: max(0, len(candidates) - keep_max)] if keep_max else []
    deleted = []
    for name in surplus:
        written = index.written.get(name)
        if every_n_hours is not None and written is not None and \
                written - (index.hours_anchor or 0.0) >= every_n_hours * 3600:
            index.preserved.append(name)
            index.hours_anchor = written
            continue
        deleted.append(name)
        index.drop(name)
    return deleted


# Files whose digest matched, by identity and change time: hashed once per process.
_VERIFIED: set[tuple] = set()
# Checkpoint files found damaged by this process: the next save moves them aside.
_DAMAGED: set[str] = set()


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
    if os.path.isdir(path) and any(os.path.islink(os.path.join(path, name))
                                   for name in os.listdir(path)):
        problem = "it holds a symbolic link, which could lead outside it"
    elif digest is not None and sha256(path) != digest:
        problem = "its SHA-256 differs from the one recorded when it was written"
    elif digest is None and not os.path.isdir(path) and not zipfile.is_zipfile(path):
        problem = "it is not a complete torch.save archive"
    else:
        _VERIFIED.add(key)
        return None
    _DAMAGED.add(os.path.abspath(path))
    return problem


def _identity(path: str, digest: str | None) -> tuple:
    """A file (or every file of a directory) as _VERIFIED knows it: any rewrite changes its
    inode, size or change time."""
    files = [path] if not os.path.isdir(path) else [
        os.path.join(path, name) for name in sorted(os.listdir(path))]
    stats = [os.stat(file) for file in files]
    return (path, digest, *((stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                            for stat in stats))


def _unlisted_checkpoints(model_dir: str, index: dict[str, str | None]) -> list[str]:
    return sorted((name for name in os.listdir(model_dir)
                   if _CHECKPOINT_NAME.match(name) and name not in index), key=step_of)


def latest_checkpoint(model_dir: str | None) -> str | None:
    """Path of the newest intact checkpoint in model_dir, or None when it has none.

    A damaged newer one (truncated, or changed since it was written) is reported by name and
    skipped: a run resumes from the previous good checkpoint. When every checkpoint the index
    lists is damaged, or the index lists none while checkpoint files are there (it was deleted),
    that is an error, not a fresh start that would overwrite them.
    """
    if not model_dir or not os.path.isdir(model_dir):
        return None
    index = read_index(model_dir).digests
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
    unlisted = _unlisted_checkpoints(model_dir, index)
    if unlisted:
        raise ValueError(
            f"model_dir {model_dir!r} holds checkpoint files that its index "
            f"({INDEX_NAME}) does not list: {', '.join(unlisted)}. The index was deleted or "
            "replaced; this run will not start afresh over them. Restore the index, or move "
            "the files out of model_dir")
    return None


def _remove_stale_temporaries(model_dir: str) -> None:
    """Half-written files of a checkpoint writer that was killed (the chief is the only one)."""
    for name in os.listdir(model_dir):
        path = os.path.join(model_dir, name)
        if name.startswith(TEMP_PREFIX):  # a link is removed, never what it leads to
            is_folder = os.path.isdir(path) and not os.path.islink(path)
            shutil.rmtree(path) if is_folder else os.remove(path)
            logger.info("Removed %s, left by an interrupted checkpoint write", name)


def _move_aside(model_dir: str, name: str, suffix: str) -> str:
    """Renames `name` to `<name>.<suffix>`, or `<name>.<suffix>.<n>` with the first free n:
    never over an existing file (a hard link fails when its target exists)."""
    source = os.path.join(model_dir, name)
    for number in itertools.count():
        target = f"{name}.{suffix}" + (f".{number}" if number else "")
        target_path = os.path.join(model_dir, target)
        try:
            os.link(source, target_path)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: look, then rename
            if os.path.lexists(target_path):
                continue
            os.rename(source, target_path)
            return target
        os.unlink(source)
        return target
    raise AssertionError("unreachable")


def _set_aside(model_dir: str, index: Index, new_name: str) -> None:
    """Moves out of the way, never deleting or overwriting them: the checkpoints this process
    found damaged (`<name>.damaged`), and a file already at `new_name` (damaged if the index
    lists it, else `<name>.unlisted`: not ours to overwrite). Drops them from the index."""
    for name in list(index.digests):
        path = os.path.abspath(os.path.join(model_dir, name))
        if path in _DAMAGED or name == new_name:
            moved = _move_aside(model_dir, name, "damaged")
            _DAMAGED.discard(path)
            index.drop(name)
            logger.warning("Moved the damaged checkpoint %s to %s", name, moved)
    if os.path.exists(os.path.join(model_dir, new_name)):
        moved = _move_aside(model_dir, new_name, "unlisted")
        logger.warning("%s was not listed in %s: moved it to %s rather than overwrite it",
                       new_name, INDEX_NAME, moved)


def save_checkpoint(model_dir: str, global_step: int, tree: Any,
                    to_host: Callable[[Any], Any], keep_checkpoint_max: int | None,
                    keep_checkpoint_every_n_hours: float | None = None) -> str:
    """Writes the checkpoint of `global_step` (the run's tree; storage.py decides one file or a
    sharded directory, `to_host` brings tensors to the host), publishes it in the index, then
    applies retention."""
    os.makedirs(model_dir, exist_ok=True)
    _remove_stale_temporaries(model_dir)
    name = checkpoint_name(global_step, storage.is_sharded(tree))
    index = read_index(model_dir)
    _set_aside(model_dir, index, name)
    path = os.path.join(model_dir, name)
    digest = storage.write(path, tree, to_host)
    _VERIFIED.add(_identity(path, digest))  # hashed as written: no read back
    index.digests[name] = digest
    index.written[name] = now()
    if index.hours_anchor is None:  # TF counts from when the saver started: here, the first save
        index.hours_anchor = index.written[name]
    deleted = retain(index, keep_checkpoint_max, keep_checkpoint_every_n_hours)
    atomic_write(os.path.join(model_dir, INDEX_NAME),
                 lambda handle: handle.write(index.to_json().encode()))
    for old in deleted:
        old_path = os.path.join(model_dir, old)
        shutil.rmtree(old_path) if os.path.isdir(old_path) else os.remove(old_path)
    logger.info("Saved checkpoint for step %d into %s", global_step, path)
    return path


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint (a file, or a sharded checkpoint's directory), or the latest checkpoint of
    a model_dir, as a path. A checkpoint given by path that its folder's index lists is
    checked against the digest recorded when it was written, as latest_checkpoint checks."""
    if os.path.isdir(path) and not _CHECKPOINT_NAME.match(os.path.basename(path)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"directory {path!r} holds no checkpoint")
        return latest
    folder, name = os.path.split(os.path.abspath(path))
    try:
        digests = read_index(folder).digests
    except ValueError:  # an unreadable index: the checkpoint's own reader still checks it
        digests = {}
    problem = damage(path, digests[name]) if name in digests else None
    if problem is not None:
        raise ValueError(f"checkpoint {path!r} is damaged: {problem}. Give another "
                         "checkpoint_path, or none to use the latest intact checkpoint")
    return path
