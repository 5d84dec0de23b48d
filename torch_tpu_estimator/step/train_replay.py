"""Replayed training (TPUConfig.replay_training): the training step is traced until two steps of
one kind compiled the same program, then that program runs on every later step, untraced.

TF's TPUEstimator builds the training step once and runs it iterations_per_loop times on the
device. Here every step of a kind (the batch's structure and shapes, the tensors the step
carries, the Python branches of the update) runs one compiled program: the traced steps too,
so replaying changes nothing but the host's work. The program reads the batch, the numbers the
update computes on the host each step (the optimizer's learning rates, bias corrections and
options: replayable_optimizers.py, sent as device data), the device RNG seed (dropout draws what
a traced step would) and the tensors the step carries: the module's parameters and buffers
(batch norm's running statistics), the optimizer's state and the EMA, whose new values replace
the old ones. The host still runs, each step, what the update does there: step counts, the LR
scheduler, the global step, host_call's every n-th step.

Replay is declined, once, with the reason in the log (every step is then traced, with the same
arithmetic) when model_fn reads the device while traced, runs the update itself, or two traced
steps of a kind compiled different graphs or read different values besides those above (a
Python number or a tensor that changes from step to step that the step does not carry). As in
TF, model_fn's Python code runs for the traced steps only: a value it appends to a list or
prints is seen for those steps.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch_xla.core.xla_model as xm
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from ..input.batches import HostBatch
from ..runtime import xla_compat
from ..runtime.base import RecompilationError
from .loop import StepRunner
from .replay import NotReplayable, batch_tensors, shapes
from .replayable_optimizers import options
from .update import UpdateStep

logger = logging.getLogger("torch_tpu_estimator")

TRACED_STEPS = 2  # steps of one kind traced, and compared, before replaying
MAX_TRACED_STEPS = 8  # traced steps with no two of a kind alike, before replay gives up
_SEED_ADVANCES = 4  # the most RNG seed advances a traced step may take (graph cuts a step)


class ReplayableProgram(Protocol):
    """What the training program gives the replay (modes/train.py)."""

    def traced_step(self, batch: HostBatch) -> Any:
        """Traces one step; returns its outputs (device tensors or None), still pending."""

    def finish_step(self, batch: HostBatch, outputs: Any) -> Any:
        """The host's work after a step, traced or replayed, and the outputs kept."""

    def replayed_host_part(self) -> list[torch.Tensor]:
        """The host's work of a replayed step before it runs (replayed_host_step); returns
        the update's numbers."""


def replayed_host_step(update: UpdateStep) -> list[torch.Tensor]:
    """What the built-in update (one optimizer) does on the host in a step, for a replayed
    one: the optimizer's step counted and its numbers sent, its LR scheduler stepped. Returns
    the numbers sent."""
    (name, stepper), = update.steppers.items()
    numbers = stepper.host_step()
    if update.schedulers[name] is not None:
        update.schedulers[name].step()
    return [numbers]


@dataclasses.dataclass(frozen=True)
class Input:
    """Where one input of the compiled step comes from: the batch, the update's numbers (the
    vector of one optimizer), a carried tensor, the RNG seed, or a fixed tensor."""

    kind: str  # "batch" | "numbers" | "carried" | "seed" | "fixed"
    index: int = 0
    fixed: torch.Tensor | None = None
    # the fixed tensor's value when traced, on the host: a tensor model_fn changes in place is
    # compared by the value each step read (the device buffer may be reused after)
    fixed_host: torch.Tensor | None = None

    def differs_from(self, other: Input) -> bool:
        if (self.kind, self.index) != (other.kind, other.index):
            return True
        if self.kind != "fixed":
            return False
        mine, theirs = self.fixed_host, other.fixed_host
        return mine.dtype != theirs.dtype or not torch.equal(mine, theirs)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """One kind of training step, compiled: its graph, where its inputs come from, which of
    its results are the step's outputs and which replace carried tensors."""

    graph_hash: str
    inputs: tuple[Input, ...]
    output_spec: TreeSpec
    present: tuple[bool, ...]  # per output leaf: a result of the graph, or None
    carried: tuple[int, ...]  # the carried tensors the step changes, one result each

    def run(self, batch: Sequence[torch.Tensor], numbers: Sequence[torch.Tensor],
            carried: Sequence[torch.Tensor], seed: torch.Tensor | None) -> Any:
        """Runs the step on these inputs; the carried tensors take their new values."""
        sources = {"batch": batch, "numbers": numbers, "carried": carried}
        return self.run_traced(
            [source.fixed if source.kind == "fixed" else seed if source.kind == "seed"
             else sources[source.kind][source.index] for source in self.inputs], carried)

    def run_traced(self, arguments: list[torch.Tensor], carried: Sequence[torch.Tensor]) -> Any:
        """Runs the step on the inputs in the graph's order (as traced); the carried tensors
        take their new values; returns the step's outputs."""
        results = xla_compat.run_compiled(self.graph_hash, arguments)
        count = sum(self.present)
        if len(results) != count + len(self.carried):
            raise RuntimeError(f"replay_training: the compiled step gave {len(results)} tensors "
                               f"for {count + len(self.carried)}; set TPUConfig("
                               "replay_training=False) (torch_xla changed?)")
        for index, result in zip(self.carried, results[count:], strict=True):
            xla_compat.assign(carried[index], result)
        leaves = iter(results[:count])
        return tree_unflatten([next(leaves) if present else None for present in self.present],
                              self.output_spec)

    def difference(self, other: StepProgram) -> str | None:
        """Why `other`, a later step of the same kind, cannot be replayed in this one's place."""
        if (other.graph_hash, other.output_spec, other.present, other.carried) != \
                (self.graph_hash, self.output_spec, self.present, self.carried):
            return "two training steps of one kind traced different graphs"
        if any(mine.differs_from(theirs)
               for mine, theirs in zip(self.inputs, other.inputs, strict=True)):
            return ("two training steps read different values besides their batch and the "
                    "optimizer's numbers: a Python number that changes every step, or a tensor "
                    "model_fn changes that is not a parameter, buffer or optimizer state")
        return None


class ReplayedTraining:
    """Runs training steps (one per group): traces the first steps of each kind through the
    program they compile, then replays it (module docstring). `readable` lays a step's outputs
    out to be read back (Replica.readable)."""

    def __init__(self, program: ReplayableProgram, update: UpdateStep, model: torch.nn.Module,
                 run_step: StepRunner, readable: Callable[[Any], Any], max_graphs: int | None):
        self.program, self.update, self.model = program, update, model
        self.run_step, self.readable, self.max_graphs = run_step, readable, max_graphs
        self.graphs: set[str] = set()  # the programs compiled (TPUConfig.max_graphs_per_mode)
        self.programs: dict[Any, list[StepProgram]] = {}
        self.traced = 0
        self.seed_advances: int | None = None
        self.declined = False
        # the carried tensors, found once a window: between two window ends only replay and
        # the host's step work run (no model_fn, no hook) and neither replaces any
        self._carried_now: list[torch.Tensor] | None = None
        if update.replay_refusal is not None:
            self._decline(update.replay_refusal)
        else:
            logger.info("replay_training: the first training steps are traced, then replayed")

    def __call__(self, group: list[HostBatch]) -> list[Any]:
        if not self.declined:
            try:
                (batch,) = group
                tensors, spec = batch_tensors(group)
                carried = self._carried_now or self._carried()
                kind = (spec, shapes(tensors), tuple(id(tensor) for tensor in carried),
                        tuple(stepper.structure() for stepper in self.update.steppers.values()))
                programs = self.programs.get(kind, [])
                if len(programs) == TRACED_STEPS:
                    self._carried_now = carried
                    return [self._replay(programs[-1], batch, tensors, carried)]
                if self.traced >= MAX_TRACED_STEPS:
                    raise NotReplayable(f"no two of the first {MAX_TRACED_STEPS} steps were of "
                                        "one kind (batch shapes, parameters or the optimizer's "
                                        "state changed at every step)")
                return [self._trace(batch, kind, tensors, carried)]
            except NotReplayable as reason:
                self._decline(reason)
        return self.run_step(lambda: [self.readable(self.program.finish_step(
            batch, self.program.traced_step(batch))) for batch in group])

    def window_ended(self) -> None:
        """Hooks may now change the module or the optimizer: find the carried tensors anew."""
        self._carried_now = None

    def _decline(self, reason: NotReplayable | str) -> None:
        self.declined = True
        logger.info("replay_training: every training step is traced, because %s", reason)

    def _carried(self) -> list[torch.Tensor]:
        """The tensors a step may change and the next one reads: parameters, buffers, the
        optimizer's state and the EMA (each once)."""
        update = self.update
        kept = [value for optimizer in update.optimizers.values()
                for slots in optimizer.state.values() for value in slots.values()
                if isinstance(value, torch.Tensor) and value.device.type == "xla"]
        ema = list(update.ema.shadow.values()) if update.ema is not None else []
        tensors = {id(tensor): tensor for tensor in [*self.model.parameters(),
                                                     *self.model.buffers(), *kept, *ema]}
        return list(tensors.values())

    def _replay(self, step: StepProgram, batch: HostBatch, tensors: list[torch.Tensor],
                carried: list[torch.Tensor]) -> Any:
        numbers = self.program.replayed_host_part()
        seed = None
        if any(source.kind == "seed" for source in step.inputs):
            seed = xla_compat.rng_seed_tensor(tensors[0].device)
        outputs = step.run(tensors, numbers, carried, seed)
        for _ in range(self.seed_advances or 0):  # as the traced step's graph cuts did
            xm.set_rng_state(xla_compat.next_rng_seed(xm.get_rng_state()))
        return self.readable(self.program.finish_step(batch, outputs))

    def _trace(self, batch: HostBatch, kind: Any, tensors: list[torch.Tensor],
               carried: list[torch.Tensor]) -> Any:
        """One step traced, compiled as a StepProgram and run by it; the program is kept for
        its kind unless the step made new state (an optimizer's first step)."""
        self.traced += 1
        self._carried_now = None  # a traced step may make new state
        if any(xla_compat.pending(carried)):  # restored weights, not yet on the device
            xla_compat.materialize(carried)
        carried_handles = {handle: Input("carried", index) for index, handle in
                           enumerate(xla_compat.data_handles(carried))}  # before the step
        seed_before, reads_before = xm.get_rng_state(), xla_compat.host_reads()
        options_before = [options(stepper.optimizer) for stepper in self.update.steppers.values()]
        compiled: list[StepProgram] = []

        def body() -> Any:
            outputs = self.program.traced_step(batch)
            try:
                if [stepper.read_options for stepper in self.update.steppers.values()] != \
                        options_before:
                    raise NotReplayable(
                        "model_fn changes the optimizer's options (a learning rate it computes): "
                        "a replay, which runs no model_fn, would keep the traced steps' value")
                step, arguments = self._compile(outputs, tensors, carried, carried_handles,
                                                reads_before)
            except NotReplayable as reason:
                self._decline(reason)
                step = None
            if step is not None:
                self._count(step.graph_hash)
                compiled.append(step)
                outputs = step.run_traced(arguments, carried)
            return self.readable(self.program.finish_step(batch, outputs))

        outputs = self.run_step(body)
        if compiled and not self.declined:
            self._keep(kind, compiled[0], seed_before)
        return outputs

    def _count(self, graph_hash: str) -> None:
        """The recompilation guard for the programs replay compiles (the step runner's counts
        the graphs it cuts)."""
        self.graphs.add(graph_hash)
        if self.max_graphs is not None and len(self.graphs) > self.max_graphs:
            raise RecompilationError(
                f"mode 'train' compiled {len(self.graphs)} different step programs, more than "
                f"the {self.max_graphs} TPUConfig.max_graphs_per_mode['train'] allows: the "
                "batch's shapes or the step's Python branches change from step to step")

    def _compile(self, outputs: Any, tensors: list[torch.Tensor], carried: list[torch.Tensor],
                 carried_handles: dict[int, Input], reads_before: dict[str, int]
                 ) -> tuple[StepProgram | None, list[torch.Tensor]]:
        """The traced step's program and the arguments it was traced with; None when the step
        made new state to carry (it then runs as traced)."""
        if self.update.by_model_fn:
            raise NotReplayable("model_fn runs the update itself (update.step, apply, minimize "
                                "or an optimizer's step()): replay covers the built-in update")
        reads = xla_compat.host_reads_since(reads_before)
        if reads is not None:
            raise NotReplayable(f"model_fn reads the device while it is traced ({reads}): a "
                                "replay would repeat what the traced steps read")
        if [id(tensor) for tensor in self._carried()] != [id(tensor) for tensor in carried]:
            return None, []
        leaves, output_spec = tree_flatten(outputs)
        computed = [leaf for leaf in leaves if leaf is not None]
        if not all(isinstance(leaf, torch.Tensor) and leaf.device.type == "xla"
                   for leaf in computed) or not all(xla_compat.pending(computed)):
            raise NotReplayable("the step's outputs are not all tensors it computes on the "
                                "XLA device")
        changed = [index for index, is_pending in enumerate(xla_compat.pending(carried))
                   if is_pending]
        graph_outputs = computed + [carried[index] for index in changed]
        ids, values = xla_compat.graph_inputs(graph_outputs)
        seed_id = xla_compat.rng_seed_id()
        known = dict(carried_handles)  # with the buffers of the batch and the numbers
        numbers = [stepper.sent for stepper in self.update.steppers.values()]
        for kind, group in (("numbers", numbers), ("batch", tensors)):
            known.update({handle: Input(kind, index) for index, handle in
                          enumerate(xla_compat.data_handles(group))})
        handles = xla_compat.data_handles([value for key, value in zip(ids, values, strict=True)
                                           if key != seed_id])
        handle_of = iter(handles)
        inputs = [Input("seed") if key == seed_id
                  else known.get(next(handle_of), Input("fixed", fixed=value))
                  for key, value in zip(ids, values, strict=True)]
        fixed = [index for index, source in enumerate(inputs) if source.kind == "fixed"]
        for index, host in zip(fixed, xla_compat.to_cpu([inputs[i].fixed for i in fixed]),
                               strict=True):  # one transfer
            inputs[index] = dataclasses.replace(inputs[index], fixed_host=host)
        step = StepProgram(xla_compat.compile_graph(graph_outputs), tuple(inputs), output_spec,
                           tuple(leaf is not None for leaf in leaves), tuple(changed))
        return step, values

    def _keep(self, kind: Any, step: StepProgram, seed_before: int) -> None:
        """Keeps a traced step's program for its kind; two alike, and the kind replays."""
        advances, seed = 0, seed_before
        while seed != xm.get_rng_state() and advances < _SEED_ADVANCES:
            seed, advances = xla_compat.next_rng_seed(seed), advances + 1
        if seed != xm.get_rng_state() or self.seed_advances not in (None, advances):
            self._decline("the device RNG seed moved in a way replay cannot follow")
            return
        self.seed_advances = advances
        programs = self.programs.setdefault(kind, [])
        programs.append(step)
        if len(programs) == TRACED_STEPS:
            difference = programs[0].difference(step)
            if difference is not None:
                self._decline(difference)
            else:
                logger.info("replay_training: replaying the compiled training step from "
                            "step %d on", self.traced + 1)
