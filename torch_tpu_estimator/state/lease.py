"""One trainer per model_dir on an object store, which has no flock: a lease object.

The lease is `.train.lease.<n>`, a JSON record of its holder and the time it expires. A trainer
takes it by creating generation n+1 with the store's conditional create (S3 `If-None-Match: *`,
GCS `ifGenerationMatch=0`): of two trainers racing for it, one gets it, the other is told who
holds it. The holder rewrites its record every third of LEASE_SECONDS; a trainer that dies stops
renewing, and its lease can be taken once it has expired (LEASE_SECONDS after the last renewal,
by the taker's clock: hosts' clocks are assumed within a few seconds of each other). A holder
that finds a newer generation (it stalled past its expiry and was replaced) has lost the lease
and stops before it publishes another checkpoint. Generations only grow: a released lease is
marked released, not deleted, so no later trainer can reuse a number another one saw.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from .locking import ModelDirInUseError, model_dir_lock
from .stores import ObjectStore, store_for

logger = logging.getLogger("torch_tpu_estimator")

LEASE_PREFIX = ".train.lease."
_GENERATION = re.compile(r"^\.train\.lease\.(\d+)$")


def lease_seconds() -> float:
    """How long a lease lasts without renewal: TORCH_TPU_ESTIMATOR_LEASE_SECONDS, else 60."""
    return float(os.environ.get("TORCH_TPU_ESTIMATOR_LEASE_SECONDS", "60"))


class Lease:
    """This process's lease on a model_dir in `store` (see the module docstring)."""

    def __init__(self, store: ObjectStore, model_dir: str):
        self.store, self.model_dir = store, model_dir
        self.seconds = lease_seconds()
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(),
                       "token": uuid.uuid4().hex}
        self.generation: int | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _path(self, generation: int) -> str:
        return self.store.join(self.model_dir, f"{LEASE_PREFIX}{generation}")

    def _generations(self) -> list[int]:
        return sorted(int(match.group(1)) for name in self.store.listdir(self.model_dir)
                      if (match := _GENERATION.match(name)))

    def _record(self, released: bool = False) -> bytes:
        expires = time.time() + (0.0 if released else self.seconds)
        return json.dumps({**self.holder, "expires": expires, "released": released,
                           "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()

    def _read(self, generation: int) -> dict[str, Any]:
        try:
            record = json.loads(self.store.read_bytes(self._path(generation)))
            return record if isinstance(record, dict) else {}
        except (FileNotFoundError, ValueError):
            return {}

    def acquire(self) -> None:
        """Takes the lease, or raises ModelDirInUseError naming the trainer that holds it."""
        self.store.makedirs(self.model_dir)
        generations = self._generations()
        latest = generations[-1] if generations else -1
        if latest >= 0:
            record = self._read(latest)
            if not record.get("released") and _number(record.get("expires")) > time.time():
                raise _in_use(self.model_dir, record)
        if not self.store.create_new(self._path(latest + 1), self._record()):
            raise _in_use(self.model_dir, self._read(latest + 1))
        self.generation = latest + 1
        if latest >= 0 and not self._read(latest).get("released"):
            logger.warning("model_dir %s: took over the expired lease of %s", self.model_dir,
                           _describe(self._read(latest)))
        for old in generations[:-1]:  # generation `latest` stays: numbers only grow
            with contextlib.suppress(FileNotFoundError):
                self.store.remove(self._path(old))
        self._renewer = threading.Thread(target=self._renew, name="lease-renewer", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            try:
                self.check()
                self.store.publish(self._path(self.generation), self._record())
            except ModelDirInUseError:
                return
            except Exception as error:  # a store that is down: try again, the lease may hold
                logger.warning("model_dir %s: could not renew the lease (%s: %s)",
                               self.model_dir, type(error).__name__, error)

    def check(self) -> None:
        """Raises ModelDirInUseError when another trainer has taken the lease since."""
        if self.lost is None:
            newer = [generation for generation in self._generations()
                     if generation > self.generation]
            if newer:
                self.lost = _describe(self._read(newer[-1]))
        if self.lost is not None:
            raise ModelDirInUseError(
                f"model_dir {self.model_dir!r}: this trainer lost its lease to {self.lost} "
                f"(it was not renewed for {self.seconds:g} s); it stops without publishing "
                "another checkpoint")

    def release(self) -> None:
        """Stops renewing and marks the lease released (if still ours)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        if self.generation is not None and self.lost is None:
            try:
                self.store.publish(self._path(self.generation), self._record(released=True))
            except Exception as error:  # never over the error that ends the run, if any
                logger.warning("model_dir %s: could not release the lease (%s: %s); it "
                               "expires %g s after its last renewal", self.model_dir,
                               type(error).__name__, error, self.seconds)


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else 0.0


def _describe(record: dict[str, Any]) -> str:
    if not record:
        return "another trainer"
    return f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('since')})"


def _in_use(model_dir: str, record: dict[str, Any]) -> ModelDirInUseError:
    remaining = max(0.0, _number(record.get("expires")) - time.time())
    return ModelDirInUseError(
        f"model_dir {model_dir!r} is in use by another trainer: {_describe(record)} holds its "
        f"lease (it expires in {remaining:.0f} s unless renewed). One process trains in a "
        "model_dir at a time; wait for it, or train in another model_dir")


@contextlib.contextmanager
def hold_lease(store: ObjectStore, model_dir: str) -> Iterator[Lease]:
    """Holds the lease on `model_dir` for the duration."""
    lease = Lease(store, model_dir)
    lease.acquire()
    try:
        yield lease
    finally:
        lease.release()


@contextlib.contextmanager
def exclusive(model_dir: str) -> Iterator[Callable[[], None]]:
    """One trainer in `model_dir` for the duration, wherever it is: a local folder's flock
    (locking.py) or a bucket's lease. Yields a check to call before publishing a checkpoint: it
    raises ModelDirInUseError once another trainer took over (never, for a flock)."""
    store = store_for(model_dir)
    if not isinstance(store, ObjectStore):
        with model_dir_lock(model_dir):
            yield lambda: None
        return
    with hold_lease(store, model_dir) as lease:
        yield lease.check
