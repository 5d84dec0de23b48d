"""Files written so that a crash never leaves half of one under its name: written to a
temporary name beside it, flushed, then renamed; hashed as they are written (never read back);
given the permissions open() and mkdir() would give them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

TEMP_PREFIX = ".tmp-checkpoint-"  # a writer's temporaries: the next save removes a killed one's


def fsync_path(path: str) -> None:
    """Flushes a file's or a directory's contents (for a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter:
    """A file handle that hashes what goes through it, so a checkpoint's SHA-256 is known
    without reading the file back, and keeps the OSError a write raised (torch.save reports a
    failed write as an unrelated RuntimeError)."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.digest = hashlib.sha256()
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            written = self.handle.write(data)
        except OSError as error:
            self.error = error
            raise
        self.digest.update(data)
        return written

    def flush(self) -> None:
        self.handle.flush()


def _write_error(error: OSError, path: str) -> OSError:
    """An OSError that says what failed, for which file: "no space left" for a full disk."""
    reason = "no space left on device" if error.errno == errno.ENOSPC else (
        error.strerror or str(error))
    return OSError(error.errno, f"{reason} while writing {path}; the checkpoints written "
                   "before it are intact")


def _umask() -> int:
    """This process's umask, read without changing it (os.umask sets it to read it, which
    would widen it for a moment in every other thread)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def creation_mode(directory: bool = False) -> int:
    """The permissions open() and mkdir() give a new file or folder under the umask: what a
    reader running as another account (an evaluator, TensorBoard, a server) expects, where
    mkstemp and mkdtemp would give 0600 and 0700."""
    return (0o777 if directory else 0o666) & ~_umask()


def atomic_write(path: str, write: Callable[[Any], None]) -> str:
    """Calls write(file) on a temporary file beside `path`, then renames it to `path`; returns
    the SHA-256 of the bytes written. The file gets the permissions open() would give it."""
    directory = os.path.dirname(path) or "."
    fd, temp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    writer = None
    try:
        os.fchmod(fd, creation_mode())
        with os.fdopen(fd, "wb") as handle:
            writer = _HashingWriter(handle)
            write(writer)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
        fsync_path(directory)
    except BaseException as error:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        failed_write = writer.error if writer is not None and writer.error is not None else error
        if isinstance(failed_write, OSError):
            raise _write_error(failed_write, path) from error
        raise
    return writer.digest.hexdigest()


def sha256(path: str) -> str:
    """A file's SHA-256; a directory's is that of its files' names and SHA-256s."""
    if os.path.isdir(path):
        listing = "".join(f"{name}:{sha256(os.path.join(path, name))}\n"
                          for name in sorted(os.listdir(path)))
        return hashlib.sha256(listing.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_directory(path: str, write: Callable[[str], None]) -> str:
    """Calls write(directory) on a temporary directory beside `path`, flushes its files, then
    renames it to `path`; returns its SHA-256 (its files are read back once to hash them). The
    directory gets the permissions mkdir() would give it."""
    parent = os.path.dirname(path) or "."
    temporary = tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=parent)
    try:
        os.chmod(temporary, creation_mode(directory=True))
        write(temporary)
        for name in os.listdir(temporary):
            fsync_path(os.path.join(temporary, name))
        fsync_path(temporary)
        digest = sha256(temporary)
        os.rename(temporary, path)
        fsync_path(parent)
    except BaseException as error:
        shutil.rmtree(temporary, ignore_errors=True)
        if isinstance(error, OSError):
            raise _write_error(error, path) from error
        raise
    return digest


