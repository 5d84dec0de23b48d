"""Starts N replica processes on this machine and brings back the chief's result or the error.

Used by the torch.distributed runtime when the estimator launches its own processes (no torchrun).
Replicas are forked, so model_fn and input_fn reach them without pickling. Each writes its
result (the chief) or its exception to a file; the parent waits, and as soon as one replica
fails it stops the others, so no process is left behind and the caller sees the first error,
with the replica's traceback, raised as the original exception type.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_POLL_SECONDS = 0.05
_PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
_TERMINATE_GRACE_SECONDS = 5.0


class ReplicaFailedError(RuntimeError):
    """A replica process died without reporting an exception (killed, or crashed in C code)."""


def _die_with_parent(parent: int) -> None:
    """Has the kernel kill this replica when the launching process dies, however it dies
    (SIGKILL, OOM killer), so replicas never outlive it (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(rank: int, scratch: str, run: Callable[[int, str], Any], parent: int) -> None:
    code = 0
    _die_with_parent(parent)
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


def _raise_root_failure(scratch: str, processes: list[multiprocessing.Process]) -> None:
    """Raises the failure that ended the job. A replica that died without a Python error
    (killed, or crashed in C) comes first: peers only ever fail *because* of such a death. Else
    the earliest error reported: the others often fail only because a peer died mid-collective.
    Called before any replica is stopped by the launcher."""
    reports = []
    for rank, process in enumerate(processes):
        path = os.path.join(scratch, f"error-{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as handle:
                reports.append((*pickle.load(handle), rank))
        elif process.exitcode not in (None, 0):
            raise ReplicaFailedError(
                f"replica {rank} exited with code {process.exitcode} without a Python error "
                "(a negative code is the signal that killed it)")
    _, error, text, rank = min(reports, key=lambda report: report[0])
    note = f"raised in replica process {rank}:\n{text}"
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10: kept where 3.11 keeps notes, though not printed
        error.__notes__ = [*getattr(error, "__notes__", []), note]
    raise error


def _autograd_device_threads() -> list[str]:
    """Names of autograd's device threads in this process (Linux), started by a backward pass
    on an XLA or CUDA device; a forked child can then never run backward again."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as handle:
                names.append(handle.read().strip())
        except OSError:
            continue
    return [name for name in names if name.startswith("pt_autograd_")]


def launch_processes(num_processes: int, run: Callable[[int, str], T]) -> T:
    """Runs run(rank, scratch_dir) in `num_processes` forked processes; returns rank 0's result.

    `scratch_dir` is a fresh directory the replicas share for the duration of the launch.
    """
    if _autograd_device_threads():
        raise RuntimeError(
            "cannot fork replica processes: this process already ran a backward pass on an XLA "
            "or CUDA device, and autograd's device threads do not survive fork. Run the "
            "multi-process use_tpu=False job from a process that has not trained on a device, "
            "or launch it with torchrun"
        )
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="torch_tpu_estimator-launch-") as scratch:
        processes = [context.Process(target=_child, args=(rank, scratch, run, os.getpid()))
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
                        _raise_root_failure(scratch, processes)
                time.sleep(_POLL_SECONDS)
        finally:
            _stop(processes)
        with open(os.path.join(scratch, "result.pkl"), "rb") as handle:
            return pickle.load(handle)
