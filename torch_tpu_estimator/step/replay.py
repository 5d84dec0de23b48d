"""Replayed inference (TPUConfig.replay_inference): evaluate and predict trace two groups of
steps, then run the program they compiled on every later group of that size, with no tracing.

TF's TPUEstimator calls model_fn once per mode and runs the graph it built on every batch. The
lazy tensor core instead traces model_fn and hashes the graph at every step, host work that for
a small model costs more than the device's. Replay does what TF does, where it is safe: it
replays only when the two traced groups compiled the same graph, read their batches' tensors at
the same places and every other input (weights, constants) with the same values, left the
model's parameters and buffers as they were, drew no random numbers, took tensors alone as
input and read nothing back from the device while traced (`.item()`, `bool(tensor)`, an op
torch_xla runs on the host such as `nonzero`: its outcome would be frozen into the program).
Otherwise it says why, once, and traces every step as before. As in TF, model_fn's Python
code then runs for the traced groups only: a Python value it reads that changes later is not
seen, and a tensor it keeps outside its outputs holds its value from the last traced group.
Replay never drops the pending work of tensors it does not own.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..input.batches import HostBatch
from ..runtime import xla_compat
from .loop import StepRunner

logger = logging.getLogger("torch_tpu_estimator")

TRACED_GROUPS = 2  # groups of one size traced and compared before replaying


class NotReplayable(Exception):
    """Why a traced group cannot be replayed (logged once, then every step is traced)."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a graph input, or an output that is not computed by the graph, comes from: a
    tensor of the step's batch (its position among the batch's tensors) or a fixed tensor."""

    batch_position: int | None = None
    fixed: torch.Tensor | None = None
    fixed_id: int | None = None

    def take(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        return batch[self.batch_position] if self.batch_position is not None else self.fixed

    def differs_from(self, other: Source) -> bool:
        """Whether two traced steps read different things here; fixed tensors that are not the
        same tensor must be equal in value (a Python number that changed is a new constant)."""
        if self.batch_position is not None or other.batch_position is not None:
            return self.batch_position != other.batch_position
        if self.fixed_id == other.fixed_id:
            return False
        mine, theirs = xla_compat.to_cpu([self.fixed, other.fixed])
        return mine.dtype != theirs.dtype or not torch.equal(mine, theirs)


def _source(tensor: torch.Tensor, batch_ids: dict[int, int]) -> Source:
    tensor_id = xla_compat.tensor_id(tensor)
    if tensor_id in batch_ids:
        return Source(batch_position=batch_ids[tensor_id])
    return Source(fixed=tensor, fixed_id=tensor_id)


@dataclasses.dataclass(frozen=True)
class GroupPlan:
    """One traced group of steps, compiled: the graph, where its inputs come from, and how its
    results and the outputs it does not compute form the steps' outputs."""

    graph_hash: str
    batch_spec: TreeSpec
    batch_shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...]
    inputs: tuple[Source, ...]
    output_spec: TreeSpec
    outputs: tuple[int | Source, ...]  # per output tensor: its graph result, or its source
    results: int  # how many tensors the graph computes

    def fits(self, spec: TreeSpec, batch: Sequence[torch.Tensor]) -> bool:
        return spec == self.batch_spec and shapes(batch) == self.batch_shapes

    def run(self, batch: Sequence[torch.Tensor]) -> Any:
        results = xla_compat.run_compiled(self.graph_hash,
                                          [source.take(batch) for source in self.inputs])
        if len(results) != self.results:
            raise RuntimeError(f"replay_inference: the compiled step gave {len(results)} "
                               f"tensors for {self.results} outputs; set "
                               "TPUConfig(replay_inference=False) (torch_xla changed?)")
        return tree_unflatten([results[out] if isinstance(out, int) else out.take(batch)
                               for out in self.outputs], self.output_spec)

    def difference(self, other: GroupPlan) -> str | None:
        """Why `other`, traced from a later batch, cannot be replayed in this plan's place."""
        if other.graph_hash != self.graph_hash or other.output_spec != self.output_spec:
            return "two groups of steps traced different graphs"
        if other.batch_spec != self.batch_spec or other.batch_shapes != self.batch_shapes:
            return "two groups of batches differ in structure or shapes"
        pairs = [*zip(self.inputs, other.inputs, strict=True),
                 *((mine, theirs) for mine, theirs in zip(self.outputs, other.outputs, strict=True)
                   if isinstance(mine, Source) and isinstance(theirs, Source))]
        if any(mine.differs_from(theirs) for mine, theirs in pairs):
            return ("two groups of steps read different values besides their batches (a Python "
                    "number, or a tensor made in model_fn from data, that changes from step to "
                    "step)")
        return None


def _state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


def shapes(tensors: Sequence[torch.Tensor]) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    return tuple((tuple(tensor.shape), tensor.dtype) for tensor in tensors)


def batch_tensors(group: Sequence[HostBatch]) -> tuple[list[torch.Tensor], TreeSpec]:
    leaves, spec = tree_flatten([(batch.features, batch.labels) for batch in group])
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    if len(tensors) != sum(leaf is not None for leaf in leaves):
        raise NotReplayable("the batch holds values that are neither tensors nor None")
    return tensors, spec


Group = list[HostBatch]
GroupRunner = Callable[[Group], list[Any]]


class ReplayedGroups:
    """Runs groups of steps (windows.groups): traces the first two of each size, then replays
    the program they compiled on the groups after.

    `trace` traces one group's steps; `run_step` runs a body as one step program (the step
    runner). A traced step that changes or replaces one of the model's parameters or buffers
    is not replayed, because the replay would not change it."""

    def __init__(self, trace: GroupRunner, run_step: StepRunner, model: torch.nn.Module):
        self.trace, self.run_step = trace, run_step
        self.model, self.state = model, _state(model)
        self.plans: dict[int, list[GroupPlan]] = {}  # by group size
        self.declined = False

    def __call__(self, group: Group) -> list[Any]:
        if not self.declined:
            try:
                tensors, spec = batch_tensors(group)
                plans = self.plans.get(len(group), [])
                if len(plans) < TRACED_GROUPS:
                    return self.run_step(lambda: self._trace_and_compile(group, tensors, spec))
                if plans[-1].fits(spec, tensors):
                    return plans[-1].run(tensors)  # no trace: no graph to cut, no device wait
                raise NotReplayable("a batch differs in structure or shapes from the traced ones")
            except NotReplayable as reason:
                self._decline(reason)
        return self.run_step(lambda: self.trace(group))

    def _decline(self, reason: NotReplayable | str) -> None:
        self.declined = True
        logger.info("replay_inference: every step is traced, because %s", reason)

    def _trace_and_compile(self, group: Group, tensors: list[torch.Tensor],
                           spec: TreeSpec) -> list[Any]:
        if any(xla_compat.pending(self.state)):  # restored weights, not yet on the device,
            xla_compat.materialize(self.state)  # would read as model_fn changing them
        before = xla_compat.host_reads()
        outputs = self.trace(group)
        try:
            reads = xla_compat.host_reads_since(before)
            if reads is not None:
                raise NotReplayable(f"model_fn reads the device while it is traced ({reads}): "
                                    "a replay would repeat what the traced steps read")
            plan, computed = self._plan(outputs, tensors, spec)
        except NotReplayable as reason:
            self._decline(reason)
            return outputs  # still pending: the step runner runs them as traced steps
        plan = dataclasses.replace(plan, graph_hash=xla_compat.compile_graph(computed))
        plans = self.plans.setdefault(len(group), [])
        plans.append(plan)
        if len(plans) == TRACED_GROUPS:
            difference = plans[0].difference(plan)
            if difference is not None:
                self._decline(difference)
        return plan.run(tensors)

    def _plan(self, outputs: list[Any], tensors: list[torch.Tensor],
              spec: TreeSpec) -> tuple[GroupPlan, list[torch.Tensor]]:
        """The plan of a traced group, and the outputs its graph computes (still pending)."""
        leaves, output_spec = tree_flatten(outputs)
        if not all(isinstance(leaf, torch.Tensor) and leaf.device.type == "xla"
                   for leaf in leaves):
            raise NotReplayable("model_fn's outputs are not all XLA tensors")
        now = _state(self.model)
        if (len(now) != len(self.state)
                or any(a is not b for a, b in zip(now, self.state, strict=True))
                or any(xla_compat.pending(self.state))):
            raise NotReplayable("model_fn changes the model's parameters or buffers")
        batch_ids = {xla_compat.tensor_id(tensor): index for index, tensor in enumerate(tensors)}
        computed: list[torch.Tensor] = []
        index_of: dict[int, int] = {}
        placed: list[int | Source] = []
        for leaf, is_pending in zip(leaves, xla_compat.pending(leaves), strict=True):
            if not is_pending:  # returned as it came in: a batch tensor or a weight
                placed.append(_source(leaf, batch_ids))
                continue
            key = xla_compat.tensor_id(leaf)  # one graph result per XLA tensor (a detached
            if key not in index_of:  # view is the same tensor)
                index_of[key] = len(computed)
                computed.append(leaf)
            placed.append(index_of[key])
        if not computed:
            raise NotReplayable("model_fn computes nothing on the device")
        ids, values = xla_compat.graph_inputs(computed)
        if xla_compat.rng_seed_id() in ids:
            raise NotReplayable("model_fn draws random numbers (each step needs a new seed)")
        inputs = tuple(Source(batch_position=batch_ids[tensor_id]) if tensor_id in batch_ids
                       else Source(fixed=value, fixed_id=tensor_id)
                       for tensor_id, value in zip(ids, values, strict=True))
        plan = GroupPlan("", spec, shapes(tensors), inputs, output_spec, tuple(placed),
                        len(computed))
        return plan, computed

