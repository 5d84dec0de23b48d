"""The update step (UpdateStep): what happens to the weights after model_fn, and what it keeps."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..api.config import UpdateConfig
from ..runtime.base import Progress, Replica
from ..state.run_state import layout_of
from ..state.schema import Checkpoint
from .ema import ExponentialMovingAverage
from .flat_update import FlatAdam, optimizer_steppers
from .micro_batches import joined, micro_batch
from .replayable_optimizers import replayable_steppers
from .update_state import current_layout


def _scaled_gradients(config: UpdateConfig, processes: int) -> str | None:
    """Why this run computes the gradients beyond one backward before every step, if it does
    (a scale, a sum): XLA fuses that into torch's per-parameter Adam update and not into the
    flat one, so flat Adam would be a float32 rounding apart (a power of two scales exactly)."""
    if config.clip_global_norm is not None:
        return ("UpdateConfig(clip_global_norm) is set: XLA fuses the clipping scale into "
                "torch's per-parameter update, not into the flat one (a float32 rounding apart)")
    if config.accumulation_steps > 1:
        return (f"UpdateConfig(accumulation_steps={config.accumulation_steps}) adds up the "
                "micro-batches' gradients, which XLA fuses into torch's per-parameter update "
                "otherwise than into the flat one (a float32 rounding apart)")
    if processes & (processes - 1):
        return (f"gradients are averaged over {processes} processes, a scale by 1/{processes} "
                "that XLA fuses into torch's per-parameter update, not into the flat one")
    return None


def _parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [parameter for group in optimizer.param_groups for parameter in group["params"]]


class UpdateStep:
    """The training update of one replica: its optimizers, schedulers and EMA, and the step.

    Built in (UpdateConfig): zero the gradients, backward, average over replicas, clip by global
    norm, step the optimizer and its LR scheduler, update the EMA; `accumulation_steps=k` runs k
    micro-batches inside one compiled step before the one update.

    In model_fn's hands (TF's `train_op` role): a model_fn that takes an argument named `update`
    may run the update itself, with as many optimizers as optimizer_fn returned (a dict):

        def model_fn(model, features, labels, mode, params, update):  # d_loss, g_loss: ...
            update.step(d_loss, "discriminator")   # zero grads, backward, reduce, clip, step
            update.step(g_loss, "generator")
            return TPUEstimatorSpec(mode, loss=d_loss.detach() + g_loss.detach())

    TF's one-forward pattern is `update.minimize({"discriminator": d_loss, "generator": g_loss})`;
    below it, `backward(loss, name)`, `apply`, `reduce_gradients`, `clip_grad_norm`. An
    optimizer's own `step()` in model_fn also puts model_fn in charge (gradients averaged first,
    its LR scheduler stepped after). The update's state is checkpointed; resume is bit for bit.

    Args:
        replica: the replica it runs on (the estimator builds it).
        model: the module whose weights it updates.
        optimizers: optimizer_fn's optimizers by name ("default" for one).
        schedulers: each optimizer's LR scheduler by name, or None.
        config: the UpdateConfig.
        replay: TPUConfig.replay_training: the optimizers take their replayable step.
    """

    def __init__(self, replica: Replica, model: torch.nn.Module,
                 optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                 config: UpdateConfig, replay: bool = False):
        self.replica, self.config = replica, config
        self.optimizers, self.schedulers = optimizers, schedulers
        replayable = replayable_steppers(optimizers) if replay else "replay is off"
        self.replay_refusal = replayable if isinstance(replayable, str) else None  # or why not
        # each optimizer's step: replayable, flat or torch's own
        self.steppers = replayable if self.replay_refusal is None else optimizer_steppers(
            optimizers, config.flat_optimizer and not replica.shards_parameters,
            _scaled_gradients(config, replica.topology.num_processes))
        self._flat = {name: stepper.__self__ for name, stepper in self.steppers.items()
                      if isinstance(getattr(stepper, "__self__", None), FlatAdam)}
        for name, optimizer in optimizers.items():
            def stepped(optimizer, args, kwargs, name=name):
                self._stepped_by_model_fn(name)
            stepped.estimator_own = True  # not a user's hook (flat_update.py)
            optimizer.register_step_pre_hook(stepped)
        self.ema = ExponentialMovingAverage(model, config.ema_decay) if config.ema_decay else None
        self.global_step = 0  # the step being run, counted from 1
        self.took_charge = False  # whether an update (model_fn's or built in) ran in this step
        self.by_model_fn = False  # whether model_fn ran this step's update itself
        # this step's training scalars by name, read back at the window's end (TensorBoard)
        self.scalars: dict[str, torch.Tensor] = {}
        self._applying: str | None = None  # the optimizer the built-in update is stepping
        self._reduced: set[str] = set()  # optimizers whose gradients are averaged, not yet used
        self._stepped_directly: set[str] = set()  # optimizers model_fn stepped itself
        self._accumulating = False

    def _named(self, name: str | None) -> str:
        if name is None:
            if len(self.optimizers) > 1:
                raise ValueError(f"several optimizers ({sorted(self.optimizers)}): name the one "
                                 "to update")
            return next(iter(self.optimizers))
        if name not in self.optimizers:
            raise ValueError(f"no optimizer named {name!r}; optimizer_fn gave "
                             f"{sorted(self.optimizers)}")
        return name

    def _stepped_by_model_fn(self, name: str) -> None:
        """An optimizer's step() was called (its pre-hook): by model_fn itself unless the
        built-in update is the caller. model_fn then runs this step's update; the gradients
        are averaged over replicas first, as xm.optimizer_step does."""
        if self._applying == name:
            return
        if self._accumulating:
            raise ValueError(
                f"model_fn stepped optimizer {name!r} itself while UpdateConfig("
                "accumulation_steps) drives the update: accumulation runs the built-in update "
                "once per step; accumulate in model_fn instead, with accumulation_steps=1")
        self.took_charge = True
        self._stepped_directly.add(name)
        if name in self._flat:  # torch's step on views of flat buffers fuses otherwise
            self._flat[name].hand_back("model_fn steps the optimizer itself")
        if name not in self._reduced:
            self.reduce_gradients(name)
        self._reduced.discard(name)  # this step uses them: the next one needs a new average

    def backward(self, loss: torch.Tensor, optimizer: str | None = None, *,
                 retain_graph: bool = False) -> None:
        """loss.backward(): gradients of this replica's batch (not yet averaged); with
        `optimizer`, for that optimizer's parameters alone (TF's var_list). `retain_graph`
        keeps the graph for another backward through it. Called from model_fn, it puts
        model_fn in charge of this step's update (no built-in one after)."""
        self.took_charge = True
        self.replica.heartbeat(Progress.UPDATE, self.global_step)
        inputs = None if optimizer is None else [
            parameter for parameter in _parameters(self.optimizers[self._named(optimizer)])
            if parameter.requires_grad]
        if inputs == []:
            return  # every parameter of that optimizer is frozen: no gradient to compute
        try:
            torch.autograd.backward(loss, inputs=inputs, retain_graph=retain_graph)
        except RuntimeError as error:
            if "device_ready_queues_" not in str(error):
                raise
            raise RuntimeError(
                "autograd cannot run backward on the XLA device: this process ran a backward "
                "pass before the XLA runtime started, and autograd's engine then knows no XLA "
                "device. Call torch_xla.device() (or train this estimator) before any other "
                "backward pass") from None

    def reduce_gradients(self, optimizer: str | None = None) -> None:
        """Averages the gradients of an optimizer's parameters over replicas (a no-op with one
        replica, and on an SPMD mesh, where the compiler already reduced them). That
        optimizer's next step, by apply() or its own step(), takes them as they are."""
        name = self._named(optimizer)
        self._reduced.add(name)
        self.replica.reduce_gradients(_parameters(self.optimizers[name]))

    def clip_grad_norm(self, max_norm: float, optimizer: str | None = None) -> torch.Tensor:
        """Scales an optimizer's gradients to a global L2 norm of at most `max_norm`; returns
        the norm before clipping (a device tensor: reading it syncs). Call it after
        reduce_gradients, so that every replica clips the same averaged gradients."""
        parameters = _parameters(self.optimizers[self._named(optimizer)])
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def apply(self, optimizer: str | None = None) -> torch.Tensor | None:
        """The built-in update from gradients already computed: reduce, clip (UpdateConfig
        .clip_global_norm), optimizer step, scheduler step. Returns the norm before clipping."""
        name = self._named(optimizer)
        if name in self._flat:  # exact on gradients straight from step or minimize only
            self._flat[name].hand_back("model_fn computed the gradients update.apply applies, "
                                       "and may have changed them (update.backward, "
                                       "loss.backward, clipping)")
        return self._apply(name)

    def _apply(self, name: str) -> torch.Tensor | None:
        self.took_charge = True
        self.replica.heartbeat(Progress.UPDATE, self.global_step)
        if name not in self._reduced:
            self.reduce_gradients(name)
        norm = None
        if self.config.clip_global_norm is not None:
            norm = self.clip_grad_norm(self.config.clip_global_norm, name)
            self.scalars["gradient_norm" + (f"/{name}" if len(self.optimizers) > 1 else "")] = \
                norm.detach()
        self._applying = name
        try:
            self.steppers[name]()
        finally:
            self._applying = None
            self._reduced.discard(name)
        if self.schedulers[name] is not None:
            self.schedulers[name].step()
        return norm

    def step(self, loss: torch.Tensor, optimizer: str | None = None) -> torch.Tensor | None:
        """The whole update of one optimizer from `loss`, run inside model_fn: zero its
        gradients, backward (for its parameters), then apply(). Returns the norm before
        clipping."""
        name = self._named(optimizer)
        self.optimizers[name].zero_grad(set_to_none=True)
        self.backward(loss, name)
        return self._apply(name)

    def minimize(self, losses: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """TF's `tf.group(opt.minimize(loss, var_list=...), ...)`: each named optimizer's
        gradients of its own loss, all from the same forward pass and the same weights, then
        each update (apply). Returns each optimizer's gradient norm before clipping."""
        if not isinstance(losses, Mapping) or not losses:
            raise TypeError("update.minimize takes a dict of optimizer name -> loss, got "
                            f"{losses!r}")
        names = [self._named(name) for name in losses]
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        for index, (name, loss) in enumerate(zip(names, losses.values(), strict=True)):
            self.backward(loss, name, retain_graph=index < len(names) - 1)
        return {name: self._apply(name) for name in names}

    def run(self, call_model_fn: Callable[[Any, Any, dict, UpdateStep | None], Any],
            features: Any, labels: Any, params: dict, step: int) -> Any:
        """One training step: model_fn on the batch (or each micro-batch), then the built-in
        update unless model_fn ran its own. Returns model_fn's spec (joined micro-batches)."""
        self.global_step, self.took_charge, self.scalars, self.by_model_fn = step, False, {}, False
        self._reduced, self._stepped_directly = set(), set()
        count = self.config.accumulation_steps
        if count == 1:
            epochs = {name: scheduler.last_epoch for name, scheduler in self.schedulers.items()
                      if scheduler is not None}
            spec = call_model_fn(features, labels, params, self)
            self.by_model_fn = self.took_charge
            if not self.by_model_fn:
                self._require_one_optimizer()
                self.backward(spec.loss)
                self._apply(self._named(None))
            self._step_schedulers_left(epochs)
        else:
            self._accumulating = True
            try:
                spec = self._accumulated(call_model_fn, features, labels, params, count)
            finally:
                self._accumulating = False
            self._apply(self._named(None))
        if self.ema is not None:
            self.ema.update()
        for optimizer in self.optimizers.values():  # used: the step's program need not keep
            optimizer.zero_grad(set_to_none=True)  # them, and the next step starts from none
        return spec

    def _step_schedulers_left(self, epochs: Mapping[str, int]) -> None:
        """Steps the scheduler of each optimizer model_fn stepped itself, unless model_fn
        stepped that scheduler too: optimizer_fn handed the scheduler to the estimator."""
        for name in sorted(self._stepped_directly):
            scheduler = self.schedulers[name]
            if scheduler is not None and scheduler.last_epoch == epochs[name]:
                scheduler.step()

    def _accumulated(self, call_model_fn: Callable[..., Any], features: Any, labels: Any,
                     params: dict, count: int) -> Any:
        self._require_one_optimizer()
        micro_params = {**params, "batch_size": params["batch_size"] // count}
        specs = []
        for index in range(count):
            spec = call_model_fn(micro_batch(features, index, count),
                                 micro_batch(labels, index, count), micro_params, None)
            self.backward(spec.loss / count)
            specs.append(spec)
        last = specs[-1]
        last.loss = torch.stack([spec.loss.detach() for spec in specs]).mean()
        if last.host_call is not None:
            last.host_call = (last.host_call[0],
                              joined([spec.host_call[1] for spec in specs]))
        return last

    def _require_one_optimizer(self) -> None:
        if len(self.optimizers) > 1:
            raise ValueError(
                f"optimizer_fn gave several optimizers ({sorted(self.optimizers)}): model_fn must "
                "run the update itself, taking an argument named `update` and calling update.step("
                "loss, name) for each (the built-in update and accumulation drive one optimizer)")

    def learning_rates(self) -> dict[str, float]:
        """Each group's learning rate before this step, as "<optimizer>/<group>" (no read)."""
        return {f"{name}/{index}": float(group["lr"]) for name, optimizer in self.optimizers.items()
                for index, group in enumerate(optimizer.param_groups)}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": {name: optimizer.state_dict()
                               for name, optimizer in self.optimizers.items()},
                "schedulers": {name: scheduler.state_dict() if scheduler is not None else None
                               for name, scheduler in self.schedulers.items()},
                "ema": self.ema.state_dict() if self.ema is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores what state_dict gave; an optimizer the checkpoint lacks starts afresh and an
        EMA it lacks starts at the restored weights (a run that adds one); a name it holds that
        this run lacks is an error. Call it after the module's weights are restored."""
        unknown = set(state["optimizers"]) - set(self.optimizers)
        if unknown:
            raise ValueError(f"the checkpoint holds optimizers {sorted(unknown)} that "
                             f"optimizer_fn does not make (it makes {sorted(self.optimizers)})")
        for name, optimizer_state in state["optimizers"].items():
            self.optimizers[name].load_state_dict(optimizer_state)
            scheduler_state = state["schedulers"].get(name)
            if self.schedulers[name] is not None and scheduler_state is not None:
                self.schedulers[name].load_state_dict(scheduler_state)
        if self.ema is not None:
            if state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self.ema.reset()

    def restore(self, saved: Checkpoint, in_place: bool) -> None:
        """Takes this step's state from `saved` (after the module's weights): with `in_place`
        (parameters sharded), a sharded checkpoint's tensors are read into the run's own,
        each device its shards; the optimizers get their state first (primed), to read into."""
        outline = current_layout(saved.outline("update"), saved.sharded_keys) or {
            "optimizers": {}, "schedulers": {}, "ema": None}  # none kept: start afresh
        layout = None
        if in_place and saved.sharded:
            from torch_xla.experimental.distributed_checkpoint import prime_optimizer

            for optimizer in self.optimizers.values():
                prime_optimizer(optimizer)
            layout = layout_of(self.state_dict())
        self.load_state_dict(saved.resolve(outline, layout))

    def weights_replaced(self) -> None:
        """The module's weights were set from outside (warm start): the EMA starts at them."""
        if self.ema is not None:
            self.ema.reset()
