"""Exclusive locks on folders, held with fcntl.flock so the kernel frees them when the holder
dies (a SIGKILL never leaves a stale lock).

`model_dir_lock` keeps a second trainer off a model_dir whose checkpoints are being written;
`hold_directory` / `remove_if_abandoned` let an exporter mark its temporary folder as in use, so
a later export can tell a killed exporter's leftovers from a running one's work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Iterator

logger = logging.getLogger("torch_tpu_estimator")

LOCK_NAME = ".train.lock"
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class ModelDirInUseError(RuntimeError):
    """Another process is training in this model_dir."""


def _try_flock(fd: int) -> bool:
    """Takes an exclusive lock on an open file or folder; False when another process has it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {record['pid']} on host {record['host']} (since {record['since']})"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not written its name yet"


def _open_lock_file(model_dir: str, path: str) -> int:
    """Opens (creating it) the lock file itself: never a file a symbolic link of that name
    leads to, which would be truncated and written outside model_dir."""
    try:
        os.makedirs(model_dir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno in _NOT_WRITABLE:
            raise PermissionError(error.errno, f"model_dir {model_dir!r} is not writable "
                                  f"({os.strerror(error.errno)}): training writes checkpoints "
                                  "there; give a writable model_dir") from None
        if error.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        kind = "a symbolic link" if os.path.islink(path) else "not a regular file"
        raise ValueError(f"{path} is {kind}: training keeps its lock in that file and neither "
                         "follows nor replaces it. Remove it if no trainer uses model_dir")
    return fd


@contextlib.contextmanager
def model_dir_lock(model_dir: str) -> Iterator[None]:
    """Holds `<model_dir>/.train.lock` for the duration: one trainer per model_dir.

    A second trainer gets ModelDirInUseError naming the holder's pid and host at once. The lock
    file is removed on release; a lock file left by a killed trainer is free (the kernel
    released its flock) and is taken over. A model_dir that cannot be written is a
    PermissionError here, before any training step.
    """
    path = os.path.join(model_dir, LOCK_NAME)
    while True:
        fd = _open_lock_file(model_dir, path)
        if not _try_flock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise ModelDirInUseError(
                f"model_dir {model_dir!r} is in use by another trainer: {holder} holds "
                f"{LOCK_NAME}. One process trains in a model_dir at a time; wait for it, or "
                "train in another model_dir")
        try:  # the previous holder may have removed the file between our open and our lock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    try:
        yield
    finally:
        os.unlink(path)  # while still locked, so no one can lock the old file meanwhile
        os.close(fd)


def hold_directory(path: str) -> int:
    """Locks a folder this process just created; returns the descriptor that holds the lock
    (close it to release)."""
    fd = os.open(path, os.O_RDONLY)
    if not _try_flock(fd):
        os.close(fd)
        raise RuntimeError(f"{path} is locked by another process")
    return fd


def remove_if_abandoned(path: str) -> bool:
    """Removes a temporary folder whose holder is gone (its lock is free); True if removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        if not _try_flock(fd):
            return False
        shutil.rmtree(path, ignore_errors=True)
        logger.info("Removed %s, left by an interrupted export", path)
        return True
    finally:
        os.close(fd)
