"""Where a run's files live: a local folder, or an object store reached through fsspec
(`gs://`, `s3://`, `memory://`, any protocol whose package is installed).

checkpoint.py and the run record speak to a Store, never to `os` or fsspec directly.
`LocalStore` is the local file system as it always was: a file is written under a temporary
name, flushed and renamed. `ObjectStore` keeps the same promise on a store that has no rename:
an object appears whole when its upload completes or not at all, so a checkpoint is uploaded
under its final name, and no reader trusts it until the index that lists it with its digest is
replaced by one PUT (checkpoint.py). A checkpoint is read from a local copy, downloaded once per
process and checked against that digest before anything is loaded from it.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from ..common.paths import checked_url, is_url, local_path, relative_inside
from . import storage
from .files import atomic_directory, atomic_write, sha256


class LocalStore:
    """The local file system: publishing is a rename, so a crash leaves nothing under a final
    name that is not whole."""

    publishes_in_place = False  # a final name only ever holds a whole, flushed file

    def join(self, folder: str, name: str) -> str:
        return os.path.join(local_path(folder), name)

    def basename(self, path: str) -> str:
        return os.path.basename(local_path(path))

    def split(self, path: str) -> tuple[str, str]:
        """The folder that holds `path` (absolute) and its name."""
        return os.path.split(os.path.abspath(local_path(path)))

    def exists(self, path: str) -> bool:
        return os.path.exists(local_path(path))

    def rename_new(self, source: str, target: str) -> bool:
        """Renames `source` to `target` unless something is there already (False then). A
        hard link fails when its target exists, so no check races with the rename."""
        source, target = local_path(source), local_path(target)
        try:
            os.link(source, target)
        except FileExistsError:
            return False
        except OSError:  # no hard links on this file system (or a folder): look, then rename
            if os.path.lexists(target):
                return False
            os.rename(source, target)
            return True
        os.unlink(source)
        return True

    def isdir(self, path: str) -> bool:
        return os.path.isdir(local_path(path))

    def listdir(self, folder: str) -> list[str]:
        return os.listdir(local_path(folder))

    def makedirs(self, folder: str) -> None:
        os.makedirs(local_path(folder), exist_ok=True)

    def read_bytes(self, path: str) -> bytes:
        with open(local_path(path), "rb") as handle:
            return handle.read()

    def publish(self, path: str, data: bytes) -> str:
        """Replaces `path` with `data` at once; returns its SHA-256."""
        return atomic_write(local_path(path), lambda handle: handle.write(data))

    def write_tree(self, path: str, tree: Any, to_host: Callable[[Any], Any]
                   ) -> tuple[str, Callable[[], None]]:
        """Writes a checkpoint's tree (storage.write) and publishes it by a rename; returns
        its SHA-256 and what is left to do to publish it: nothing."""
        return storage.write(local_path(path), tree, to_host), lambda: None

    def copy_in(self, local: str, path: str) -> None:
        """Copies a local file or folder to `path`, published whole (a rename); an existing
        folder at `path` is kept (a checkpoint's name holds one content)."""
        if os.path.isdir(local):
            if not os.path.exists(local_path(path)):
                atomic_directory(local_path(path), lambda temporary: shutil.copytree(
                    local, temporary, dirs_exist_ok=True))
            return
        with open(local, "rb") as source:
            atomic_write(local_path(path), lambda handle: shutil.copyfileobj(source, handle))

    def remove(self, path: str) -> None:
        path = local_path(path)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) \
            else os.remove(path)

    def identity(self, path: str) -> tuple:
        """What changes whenever the file (or a file of the folder) at `path` is rewritten:
        its inode, size and change times. FileNotFoundError when it is gone."""
        path = local_path(path)
        files = [path] if not os.path.isdir(path) else [
            os.path.join(path, name) for name in sorted(os.listdir(path))]
        stats = [os.stat(file) for file in files]
        return tuple((stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
                     for stat in stats)

    def sha256(self, path: str) -> str:
        return sha256(local_path(path))

    def local_copy(self, path: str) -> str:
        """A local path to read `path` from: itself."""
        return local_path(path)


KEPT_COPIES = 2  # local copies of a bucket's checkpoints or exports kept at once


class ObjectStore:
    """A bucket (or any fsspec file system) through fsspec. Listings are never cached: another
    host may have written since."""

    publishes_in_place = True  # a checkpoint lies under its final name before the index lists it

    def __init__(self, url: str):
        import fsspec  # an optional dependency, needed for URLs only

        protocol = checked_url(url, "path").split("://", 1)[0]
        self.fs = fsspec.filesystem(protocol, use_listings_cache=False, skip_instance_cache=True)
        self.protocol = protocol
        self._copies: dict[str, tuple[tuple, str]] = {}  # url -> (identity, local copy)

    def join(self, folder: str, name: str) -> str:
        return f"{folder.rstrip('/')}/{name}"

    def basename(self, path: str) -> str:
        return posixpath.basename(path.rstrip("/"))

    def split(self, path: str) -> tuple[str, str]:
        folder, _, name = path.rstrip("/").rpartition("/")
        return folder, name

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def rename_new(self, source: str, target: str) -> bool:
        """Moves `source` to `target` (copies, then deletes) unless `target` exists."""
        if self.fs.exists(target):
            return False
        self.fs.mv(source, target, recursive=self.fs.isdir(source))
        return True

    def isdir(self, path: str) -> bool:
        return self.fs.isdir(path)

    def listdir(self, folder: str) -> list[str]:
        try:
            found = self.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(name.rstrip("/")) for name in found} - {""})

    def makedirs(self, folder: str) -> None:
        self.fs.makedirs(folder, exist_ok=True)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def publish(self, path: str, data: bytes) -> str:
        """Replaces the object at `path` with `data` in one PUT; returns its SHA-256."""
        self.fs.pipe_file(path, data)
        return hashlib.sha256(data).hexdigest()

    def write_tree(self, path: str, tree: Any, to_host: Callable[[Any], Any]
                   ) -> tuple[str, Callable[[], None]]:
        """Writes a checkpoint's tree into a local staging folder (storage.write, hashed as
        written); returns its SHA-256 and the upload still to do (which removes the staged
        copy), to be run now or in the background."""
        staging = tempfile.mkdtemp(dir=_scratch())
        staged = os.path.join(staging, self.basename(path))
        try:
            digest = storage.write(staged, tree, to_host)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

        def upload() -> None:
            try:
                self.upload(staged, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)

        return digest, upload

    def upload(self, local: str, path: str, last: str | None = None) -> None:
        """Uploads a local file, or a folder's files, to `path`, each object whole or not at
        all; the file named `last` (relative to the folder) after every other one, so that a
        reader who waits for it never sees the folder half uploaded."""
        if not os.path.isdir(local):
            self.fs.put_file(local, path)
            return
        files = sorted(os.path.relpath(os.path.join(root, name), local)
                       for root, _, names in os.walk(local) for name in names)
        for name in sorted(files, key=lambda name: name == last):
            self.fs.put_file(os.path.join(local, name), self.join(path, name.replace(os.sep, "/")))

    def copy_in(self, local: str, path: str) -> None:
        """Uploads a local file or folder to `path`, each object whole."""
        self.upload(local, path)

    def create_new(self, path: str, data: bytes) -> bool:
        """Creates the object at `path` holding `data` unless one exists (False then), as one
        conditional PUT: of two creators, exactly one succeeds."""
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, path: str) -> None:
        self.fs.rm(path, recursive=self.fs.isdir(path))

    def identity(self, path: str) -> tuple:
        """Each object's name, size and version tag (ETag, generation or modification time);
        FileNotFoundError when there is none."""
        if not self.fs.isdir(path):
            return (_version(self.fs.info(path)),)
        found = self.fs.find(path, detail=True)
        if not found:
            raise FileNotFoundError(path)
        return tuple(_version(info) for _, info in sorted(found.items()))

    def sha256(self, path: str) -> str:
        return sha256(self.local_copy(path))

    def local_copy(self, path: str, pinned: bool = False) -> str:
        """A local copy of the object (or folder of objects) at `path`, downloaded once while
        it stays the same. Of the copies not `pinned` (an export being served is), only the
        KEPT_COPIES latest stay on disk (an evaluation per checkpoint would otherwise fill
        TMPDIR); the rest go when the process exits."""
        identity = self.identity(path)
        known = self._copies.pop(path, None)
        if known is not None and known[0] == identity and os.path.exists(known[1]):
            self._copies[path] = known  # now the most recent
            return known[1]
        while not pinned and len(self._copies) >= KEPT_COPIES:
            _, old = self._copies.pop(next(iter(self._copies)))  # a mapped file stays readable
            shutil.rmtree(os.path.dirname(old), ignore_errors=True)
        copy = os.path.join(tempfile.mkdtemp(dir=_scratch()), self.basename(path))
        if self.fs.isdir(path):
            root = self.fs._strip_protocol(path).rstrip("/") + "/"
            for found in self.fs.find(path):
                name = relative_inside(found[len(root):], f"the listing of {path}")
                os.makedirs(os.path.dirname(os.path.join(copy, name)), exist_ok=True)
                self.fs.get_file(self.join(path, name), os.path.join(copy, name))
        else:
            self.fs.get_file(path, copy)
        if not pinned:
            self._copies[path] = (identity, copy)
        return copy


def _version(info: dict[str, Any]) -> tuple:
    tag = next((info[key] for key in ("ETag", "etag", "generation", "mtime", "LastModified",
                                      "created") if info.get(key) is not None), None)
    return (info.get("name"), info.get("size"), str(tag))


_SCRATCH: list[str] = []


def _scratch() -> str:
    """This process's local folder for staged uploads and downloaded copies, removed at exit."""
    if not _SCRATCH:
        _SCRATCH.append(tempfile.mkdtemp(prefix="torch_tpu_estimator-"))
        atexit.register(shutil.rmtree, _SCRATCH[0], True)
    return _SCRATCH[0]


# by protocol and process: one client and one copy cache each (a forked replica makes its own:
# a client's connections and event loop do not survive a fork)
_OBJECT_STORES: dict[tuple[str, int], ObjectStore] = {}


def store_for(path: str) -> LocalStore | ObjectStore:
    """The store that holds `path`: an ObjectStore for a URL, else the local file system."""
    if not is_url(path):
        return LocalStore()
    key = (path.split("://", 1)[0], os.getpid())
    if key not in _OBJECT_STORES:
        _OBJECT_STORES[key] = ObjectStore(path)
    return _OBJECT_STORES[key]
