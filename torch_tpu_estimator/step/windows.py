"""Windows of steps: how many steps run on the device between two visits of the host.

`TPUConfig.iterations_per_loop` sets a window's size, or a time budget ("30s"); a window also
ends where a stop falls (the target step, a hook's last step), so the global step lands exactly
on it. Inside a window nothing is read from the device. Evaluate and predict may also run a
window's steps in groups, each one device program (TPUConfig.inference_steps_per_execution).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence

from ..api.hooks import Hook
from ..input.batches import HostBatch
from ..runtime.base import Replica
from .plan import ExecutionPlan
from .preemption import TerminationRequest


def groups(batches: Iterator[HostBatch], size: int) -> Iterator[list[HostBatch]]:
    """Consecutive batches in lists of `size`; the last may be shorter."""
    group: list[HostBatch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def steps_to_next_stop(step: int, target: int | None, hooks: Sequence[Hook]) -> float:
    """Steps left before the target or a hook's last step, so the last window lands on it."""
    stops = [target] + [hook.last_step() for hook in hooks]
    return min([stop - step for stop in stops if stop is not None], default=math.inf)


class WindowedBatches:
    """Hands out a run's device batches window by window; remembers when the input ended.

    Every process must run the same steps in a window (their collectives pair up). With step
    count windows over per-host input they do by construction. Otherwise (ExecutionPlan
    .agree_each_step) the processes agree before each step, in one host collective, on whether
    any stream has ended and whether the chief's time budget is spent. One batch is read ahead
    for that, and kept for the next window when this one ends first. With one process, SIGTERM
    (`interrupt`) ends the window before the next step; several processes stop together at the
    window's end instead (loop.py). A time budget ends a window only after a whole number (at
    least one) of groups of `plan.steps_per_program` steps, so grouped steps compile one graph.
    """

    def __init__(self, batches: Iterator[HostBatch], plan: ExecutionPlan, replica: Replica,
                 interrupt: TerminationRequest | None = None):
        self.batches, self.plan, self.replica = batches, plan, replica
        self.interrupt = interrupt if replica.topology.num_processes == 1 else None
        self.exhausted = False
        self.started = time.perf_counter()
        self._ahead: HostBatch | None = None

    def window(self, limit: float = math.inf) -> Iterator[HostBatch]:
        """The next window's batches: at most `limit` and the window size, within its time budget."""
        self.started = time.perf_counter()
        count, limit = 0, min(limit, self.plan.window_steps)
        while count < limit and not self.exhausted:
            if self.interrupt is not None and self.interrupt.requested:
                return
            if self._ahead is None:
                self._ahead = next(self.batches, None)
            ended = self._ahead is None
            time_up = (self.plan.window_seconds < math.inf and self.replica.is_chief
                       and count > 0 and count % self.plan.steps_per_program == 0
                       and self.seconds() >= self.plan.window_seconds)
            if self.plan.agree_each_step:
                flags = self.replica.host_gather((ended, time_up))
                ended, time_up = any(flag[0] for flag in flags), any(flag[1] for flag in flags)
            if ended:
                self.exhausted = True
            if ended or time_up:
                return
            batch, self._ahead = self._ahead, None
            count += 1
            yield batch

    def seconds(self) -> float:
        """Time since the current window started."""
        return time.perf_counter() - self.started

    def close(self) -> None:
        """Stops reading the input (a DataLoader's workers end with it)."""
        self.batches.close()
