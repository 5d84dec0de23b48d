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

from ..common.signals import on_sigterm
from .base import Progress

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
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the launcher's forwarding handler
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


class Heartbeats:
    """When each replica last showed progress, and where it was: shared memory written by the
    replicas (a store of two numbers, no lock, no syscall) and read by the launcher's watchdog."""

    PHASES = {Progress.STARTING: "starting", Progress.INPUT: "waiting for its input",
              Progress.MODEL_FN: "in model_fn",
              Progress.UPDATE: "in backward or the optimizer update",
              Progress.HOST: "at a window end before it (host work, collectives, checkpoint)"}

    def __init__(self, context: Any, count: int):
        self._times = context.Array("d", [time.time()] * count, lock=False)
        self._phases = context.Array("i", count, lock=False)
        self._steps = context.Array("q", count, lock=False)

    def beat(self, rank: int, phase: int, step: int) -> None:
        self._phases[rank], self._steps[rank] = phase, step
        self._times[rank] = time.time()

    def silent_for(self) -> float:
        """Seconds since the most recent progress of any replica."""
        return time.time() - max(self._times)

    def describe(self, rank: int, pid: int) -> str:
        state = _process_state(pid)
        stopped = ", its process is stopped (SIGSTOP or a debugger)" if state == "T" else ""
        return (f"replica {rank} was last {self.PHASES[Progress(self._phases[rank])]} (step "
                f"{self._steps[rank]}), {time.time() - self._times[rank]:.1f} s ago{stopped}")

    def furthest_behind(self) -> int:
        """The replica the others wait for: the least far in (step, phase), the least recent
        among equals."""
        return min(range(len(self._times)), key=lambda rank: (
            self._steps[rank], self._phases[rank], self._times[rank]))


class ReplicaHungError(RuntimeError):
    """No replica made progress for TPUConfig.replica_timeout_secs: one of them hangs."""


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "?"


def _forward_sigterm(processes: list[multiprocessing.Process]) -> None:
    """SIGTERM to the launcher, passed on to the replicas (they checkpoint and end) instead of
    killing the launcher, whose death would SIGKILL them (PR_SET_PDEATHSIG)."""
    for process in processes:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)


def launch_processes(num_processes: int, run: Callable[[int, str, Heartbeats], T],
                     timeout_secs: float | None = None) -> T:
    """Runs run(rank, scratch_dir, heartbeats) in `num_processes` forked processes; returns
    rank 0's result.

    `scratch_dir` is a fresh directory the replicas share for the duration of the launch.
    With `timeout_secs`, a watchdog ends the job with ReplicaHungError when no replica has
    beaten its heartbeat for that long, naming the replica the others wait for.
    """
    if _autograd_device_threads():
        raise RuntimeError(
            "cannot fork replica processes: this process already ran a backward pass on an XLA "
            "or CUDA device, and autograd's device threads do not survive fork. Run the "
            "multi-process use_tpu=False job from a process that has not trained on a device, "
            "or launch it with torchrun"
        )
    context = multiprocessing.get_context("fork")
    heartbeats = Heartbeats(context, num_processes)
    with tempfile.TemporaryDirectory(prefix="torch_tpu_estimator-launch-") as scratch:
        processes = [context.Process(target=_child, args=(rank, scratch, lambda rank, scratch:
                                                          run(rank, scratch, heartbeats),
                                                          os.getpid()))
                     for rank in range(num_processes)]
        try:
            with on_sigterm(lambda: _forward_sigterm(processes)):
                for process in processes:
                    process.start()
                _wait(processes, scratch, heartbeats, timeout_secs)
        finally:
            _stop(processes)
        with open(os.path.join(scratch, "result.pkl"), "rb") as handle:
            return pickle.load(handle)


def _wait(processes: list[multiprocessing.Process], scratch: str, heartbeats: Heartbeats,
          timeout_secs: float | None) -> None:
    """Returns when every replica has exited cleanly; raises the root failure, or
    ReplicaHungError when the replicas made no progress for `timeout_secs`."""
    running = set(range(len(processes)))
    while running:
        for rank in sorted(running):
            exitcode = processes[rank].exitcode
            if exitcode is None:
                continue
            running.discard(rank)
            if exitcode != 0:
                _raise_root_failure(scratch, processes)
        if timeout_secs is not None and running and heartbeats.silent_for() > timeout_secs:
            behind = heartbeats.furthest_behind()
            raise ReplicaHungError(
                f"no replica made progress for {timeout_secs:g} s "
                f"(TPUConfig.replica_timeout_secs): "
                f"{heartbeats.describe(behind, processes[behind].pid)}; the others wait for "
                "it. Every replica was stopped")
        time.sleep(_POLL_SECONDS)
