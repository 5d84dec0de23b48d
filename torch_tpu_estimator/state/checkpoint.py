"""Checkpoints in model_dir: writing and publishing them, finding the latest intact one,
damage. (The index, checkpoint.json, and retention: index.py.)

A checkpoint is `model.ckpt-<global_step>.pt`, one file, or `model.ckpt-<global_step>/`, a
directory when its tensors are sharded (storage.py decides and writes), written under a
temporary name, flushed to disk, then renamed, so a crash never leaves half of one under a
checkpoint's name. `checkpoint.json` lists the kept checkpoints, newest last; it is
rewritten the same way, after the checkpoint it names is complete, with each checkpoint's
SHA-256: a checkpoint damaged later (truncated by a full disk, changed by hand) is reported by
name and skipped for the previous one, and the next save moves it aside as `<name>.damaged`
(never deleted, never overwritten).

model_dir may be a bucket (stores.py): there a checkpoint is uploaded under its final name
before the index lists it, so a checkpoint the index does not list is a killed upload's
leftover, never trusted, and the next save removes it. The index itself is replaced by one PUT.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
import zipfile
from collections.abc import Callable
from typing import Any

from . import storage
from .files import TEMP_PREFIX
from .index import CHECKPOINT_NAME, INDEX_NAME, Index, checkpoint_name, read_index, retain, step_of
from .stores import LocalStore, ObjectStore, store_for
from .uploads import BackgroundPublisher

logger = logging.getLogger("torch_tpu_estimator")


def now() -> float:
    """The wall clock checkpoints are timed by (tests replace it)."""
    return time.time()


# Checkpoints whose digest matched, by store identity (inode and change time, or object
# version): hashed once per process.
_VERIFIED: set[tuple] = set()
# Checkpoint files found damaged by this process: the next save moves them aside.
_DAMAGED: set[str] = set()


def damage(path: str, digest: str | None) -> str | None:
    """Why the checkpoint file at `path` cannot be trusted, or None when it is whole: it is
    gone, its SHA-256 differs from the one recorded when it was written, or (with no record)
    it is not a complete torch.save archive."""
    store = store_for(path)
    try:
        key = (path, digest, store.identity(path))
    except FileNotFoundError:  # removed by retention since the index was read
        return "it no longer exists"
    if key in _VERIFIED:
        return None
    local = store.local_copy(path)
    if os.path.isdir(local) and any(os.path.islink(os.path.join(local, name))
                                    for name in os.listdir(local)):
        problem = "it holds a symbolic link, which could lead outside it"
    elif digest is not None and store.sha256(path) != digest:
        problem = "its SHA-256 differs from the one recorded when it was written"
    elif digest is None and not os.path.isdir(local) and not zipfile.is_zipfile(local):
        problem = "it is not a complete torch.save archive"
    else:
        _VERIFIED.add(key)
        return None
    _DAMAGED.add(_absolute(path))
    return problem


def _absolute(path: str) -> str:
    return path if isinstance(store_for(path), ObjectStore) else os.path.abspath(path)


def _unlisted_checkpoints(model_dir: str, index: Index) -> list[str]:
    return sorted((name for name in store_for(model_dir).listdir(model_dir)
                   if CHECKPOINT_NAME.match(name) and name not in index.digests), key=step_of)


def latest_checkpoint(model_dir: str | None) -> str | None:
    """Path of the newest intact checkpoint in model_dir, or None when it has none.

    A damaged newer one (truncated, or changed since it was written) is reported by name and
    skipped: a run resumes from the previous good checkpoint. When every checkpoint the index
    lists is damaged, or the index lists none while checkpoint files are there (it was deleted),
    that is an error, not a fresh start that would overwrite them.
    """
    store = store_for(model_dir or "")
    if not model_dir or not store.isdir(model_dir):
        return None
    found = read_index(model_dir)
    index = found.digests if found is not None else {}
    for name, digest in reversed(index.items()):
        path = store.join(model_dir, name)
        problem = damage(path, digest)
        if problem is None:
            return path
        logger.warning("Checkpoint %s is damaged (%s): it is skipped and left in place; the "
                       "previous checkpoint is used", path, problem)
    if index:
        raise ValueError(
            f"every checkpoint listed in {store.join(model_dir, INDEX_NAME)} is damaged "
            f"({', '.join(index)}): nothing to resume from. Move them out of model_dir to "
            "start afresh, or restore them from a backup")
    if found is not None and store.publishes_in_place:
        return None  # on a bucket, what the index does not list is an upload's leftover
    unlisted = _unlisted_checkpoints(model_dir, found or Index())
    if unlisted:
        raise ValueError(
            f"model_dir {model_dir!r} holds checkpoint files that its index "
            f"({INDEX_NAME}) does not list: {', '.join(unlisted)}. The index was deleted or "
            "replaced; this run will not start afresh over them. Restore the index, or move "
            "the files out of model_dir")
    return None


def _remove_leftovers(store: LocalStore | ObjectStore, model_dir: str,
                      index: Index | None) -> None:
    """What a killed checkpoint writer left (the chief is the only one): temporaries, and on a
    bucket the checkpoints an existing index does not list (uploads it never published)."""
    for name in store.listdir(model_dir):
        leftover = name.startswith(TEMP_PREFIX) or (
            store.publishes_in_place and index is not None and CHECKPOINT_NAME.match(name)
            and name not in index.digests)
        if leftover:  # a link is removed, never what it leads to
            store.remove(store.join(model_dir, name))
            logger.info("Removed %s, left by an interrupted checkpoint write", name)


def _move_aside(store: LocalStore | ObjectStore, model_dir: str, name: str, suffix: str) -> str:
    """Renames `name` to `<name>.<suffix>`, or `<name>.<suffix>.<n>` with the first free n:
    never over an existing file."""
    source = store.join(model_dir, name)
    for number in itertools.count():
        target = f"{name}.{suffix}" + (f".{number}" if number else "")
        if store.rename_new(source, store.join(model_dir, target)):
            return target
    raise AssertionError("unreachable")


def _set_aside(store: LocalStore | ObjectStore, model_dir: str, index: Index,
               new_name: str) -> None:
    """Moves out of the way, never deleting or overwriting them: the checkpoints this process
    found damaged (`<name>.damaged`), and a file already at `new_name` (damaged if the index
    lists it, else `<name>.unlisted`: not ours to overwrite). Drops them from the index."""
    for name in list(index.digests):
        path = _absolute(store.join(model_dir, name))
        if path in _DAMAGED or name == new_name:
            moved = _move_aside(store, model_dir, name, "damaged")
            _DAMAGED.discard(path)
            index.drop(name)
            logger.warning("Moved the damaged checkpoint %s to %s", name, moved)
    if store.exists(store.join(model_dir, new_name)):
        moved = _move_aside(store, model_dir, new_name, "unlisted")
        logger.warning("%s was not listed in %s: moved it to %s rather than overwrite it",
                       new_name, INDEX_NAME, moved)


def start_index(model_dir: str) -> None:
    """On a bucket, publishes an empty index before the first checkpoint, so that a first
    upload killed midway is known for a leftover, not taken for checkpoints whose index was
    deleted. (A local folder needs none: its checkpoints appear whole, by a rename.)"""
    store = store_for(model_dir)
    if store.publishes_in_place and read_index(model_dir) is None and \
            not _unlisted_checkpoints(model_dir, Index()):
        store.publish(store.join(model_dir, INDEX_NAME), Index().to_json().encode())


def save_checkpoint(model_dir: str, global_step: int, tree: Any,
                    to_host: Callable[[Any], Any], keep_checkpoint_max: int | None,
                    keep_checkpoint_every_n_hours: float | None = None,
                    still_owner: Callable[[], None] | None = None,
                    publisher: BackgroundPublisher | None = None) -> str:
    """Writes the checkpoint of `global_step` (the run's tree; storage.py decides one file or a
    sharded directory, `to_host` brings tensors to the host), publishes it in the index, then
    applies retention. `still_owner` raises, before anything is published, when this trainer
    no longer holds model_dir (its lease was taken over). On a bucket, with a `publisher`, the
    upload and what follows it run in the background (uploads.py)."""
    if publisher is not None:
        publisher.wait()  # never two in flight: the index below is the last one published
    store = store_for(model_dir)
    store.makedirs(model_dir)
    found = read_index(model_dir)
    _remove_leftovers(store, model_dir, found)
    index = found or Index()
    name = checkpoint_name(global_step, storage.is_sharded(tree))
    _set_aside(store, model_dir, index, name)
    path = store.join(model_dir, name)
    digest, upload = store.write_tree(path, tree, to_host)
    written = now()

    def publish() -> None:
        upload()
        _VERIFIED.add((path, digest, store.identity(path)))  # hashed as written: no read back
        index.digests[name] = digest
        index.written[name] = written
        if index.hours_anchor is None:  # TF counts from the saver's start: here, the first save
            index.hours_anchor = written
        deleted = retain(index, keep_checkpoint_max, keep_checkpoint_every_n_hours)
        if still_owner is not None:
            still_owner()
        store.publish(store.join(model_dir, INDEX_NAME), index.to_json().encode())
        for old in deleted:
            store.remove(store.join(model_dir, old))
        logger.info("Saved checkpoint for step %d into %s", global_step, path)

    if publisher is not None and store.publishes_in_place:
        publisher.submit(f"the checkpoint of step {global_step} to {path}", publish)
    else:
        publish()
    return path


def resolve_checkpoint_path(path: str) -> str:
    """A checkpoint (a file, or a sharded checkpoint's directory), or the latest checkpoint of
    a model_dir, as a path. A checkpoint given by path that its folder's index lists is
    checked against the digest recorded when it was written, as latest_checkpoint checks."""
    store = store_for(path)
    if store.isdir(path) and not CHECKPOINT_NAME.match(store.basename(path)):
        latest = latest_checkpoint(path)
        if latest is None:
            raise ValueError(f"directory {path!r} holds no checkpoint")
        return latest
    folder, name = store.split(path)
    try:
        found = read_index(folder)
    except ValueError:  # an unreadable index: the checkpoint's own reader still checks it
        found = None
    digests = found.digests if found is not None else {}
    problem = damage(path, digests[name]) if name in digests else None
    if problem is not None:
        raise ValueError(f"checkpoint {path!r} is damaged: {problem}. Give another "
                         "checkpoint_path, or none to use the latest intact checkpoint")
    return path
