"""Starts N replica processes on this machine and brings back the chief's result or the error.

Used by the torch.distributed runtime when the estimator launches its own processes (no torchrun).
Replicas are forked, so model_fn and input_fn reach them without pickling. Each writes its
result (the chief) or its exception to a file; the parent waits, and as soon as one replica
fails it stops the others, so no process is left behind and the caller sees the first error,
with the replica's traceback, raised as the original exception type.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.05
_TERMINATE_GRACE_SECONDS = 5.0


class ReplicaFailedError(RuntimeError):
    """A replica process died without reporting an exception (killed, or crashed in C code)."""


def _child(rank: int, scratch: str, run: Callable[[int, str], Any]) -> None:
    code = 0
    try:
        result = run(rank, scratch)
        if rank == 0:
            _dump(os.path.join(scratch, "result.pkl"), result)
    except BaseException as error:  # reported to the parent, which re-raises it
        code = 1
        _dump(os.path.join(scratch, f"error-{rank}.pkl"),
              (time.time(), _portable(error), traceback.format_exc()))
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip the parent's atexit handlers, inherited by fork


def _portable(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        return pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _dump(path: str, value: Any) -> None:
    with open(path + ".tmp", "wb") as handle:
        pickle.dump(value, handle)
    os.replace(path + ".tmp", path)


def _stop(processes: list[multiprocessing.Process]) -> None:
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def _raise_first_failure(scratch: str, rank: int, exitcode: int | None) -> None:
    """Raises the earliest error any replica reported: the others often fail only because a
    peer died in the middle of a collective."""
    reports = []
    for name in os.listdir(scratch):
        if name.startswith("error-") and name.endswith(".pkl"):
            with open(os.path.join(scratch, name), "rb") as handle:
                reports.append((*pickle.load(handle), int(name[len("error-"):-len(".pkl")])))
    if not reports:
        raise ReplicaFailedError(f"replica {rank} exited with code {exitcode} without a Python "
                                 "error (killed, or crashed outside Python)")
    _, error, text, failed_rank = min(reports, key=lambda report: report[0])
    error.add_note(f"raised in replica process {failed_rank}:\n{text}")
    raise error


def launch_processes(num_processes: int, run: Callable[[int, str], T]) -> T:
    """Runs run(rank, scratch_dir) in `num_processes` forked processes; returns rank 0's result.

    `scratch_dir` is a fresh directory the replicas share for the duration of the launch.
    """
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="torch_tpu_estimator-launch-") as scratch:
        processes = [context.Process(target=_child, args=(rank, scratch, run), daemon=False)
                     for rank in range(num_processes)]
        try:
            for process in processes:
                process.start()
            running = set(range(num_processes))
            while running:
                for rank in sorted(running):
                    exitcode = processes[rank].exitcode
                    if exitcode is None:
                        continue
                    running.discard(rank)
                    if exitcode != 0:
                        _stop(processes)
                        _raise_first_failure(scratch, rank, exitcode)
                time.sleep(_POLL_SECONDS)
        finally:
            _stop(processes)
        with open(os.path.join(scratch, "result.pkl"), "rb") as handle:
            return pickle.load(handle)
