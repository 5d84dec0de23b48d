"""Adam and AdamW stepped over one flat buffer per parameter group, on XLA: torch's arithmetic in
a handful of traced ops.

On XLA the host traces every op of a step, and torch.optim.Adam's chain of in-place ops per
parameter, each through torch's Python shape checks, was 75% of a small model's step. Here a
group's parameters become views into one flat buffer and its two moments are flat too: a step
concatenates the gradients once and runs torch's own formula (`_single_tensor_adam`, the
non-capturable path: the same ops in the same order, with the same Python-float bias
corrections) on the three buffers, out of place with one copy back per buffer. The optimizer
keeps torch's state layout (each parameter's moments are views of the flat ones, its step a CPU
tensor), so its state_dict, checkpoints and a resume are unchanged; a state loaded from a
checkpoint is copied into the flat buffers at the next step.

What the numbers are: every element goes through torch's formula, op for op, and the result is
torch's own Adam bit for bit where nothing but backward made the gradients and no decoupled
weight decay applies. Elsewhere XLA fuses the flat graph otherwise than torch's per-parameter
one (a clipping scale or a decay folded into the update as one fused multiply-add rounds once
instead of twice), so those cases never take the flat path (`flat_refusal`).

What it does not cover it leaves, with a log line saying why, to torch's own `optimizer.step()`:
from the start, gradients computed beyond one backward (clipping, accumulation, an average over a
number of processes that is not a power of two), AdamW's decay and optimizers that share a
parameter; from the step it happens on, a parameter that stops being a view of its buffer
(`param.data = ...`), groups that change (`add_param_group`), a parameter without a gradient in a
step (frozen, or unused), step counts that differ (a checkpoint of such a run), options it does
not cover, step or gradient hooks (the flat step skips the first and rounds the second otherwise),
and gradients model_fn computed itself and hands to `update.apply` or steps with the optimizer's
own step() (update.py calls `hand_back`). Each parameter and moment then gets its own storage
back, so torch's steps run as they would have from the start.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping

import torch
from torch.optim import optimizer as torch_optimizer

logger = logging.getLogger("torch_tpu_estimator")

_FLAT_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False,
                 "differentiable": False}


def _storage(tensor: torch.Tensor) -> int:
    """Which storage a tensor's data lives in (views of one buffer share it)."""
    return tensor.untyped_storage()._cdata


def flat_refusal(optimizer: torch.optim.Optimizer, run_refusal: str | None = None) -> str | None:
    """Why `optimizer` cannot take the flat step and give torch's numbers bit for bit, or None:
    a torch Adam or AdamW whose parameters are dense float32 tensors on one XLA device, each
    once, with the options `_options_refusal` accepts. `run_refusal` is the run's own reason,
    if it has one (gradients scaled before the step: clipping, an average over processes)."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return f"it covers Adam and AdamW, not {type(optimizer).__name__}"
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    devices = {parameter.device for parameter in parameters}
    try:
        [_storage(parameter) for parameter in parameters]
    except (RuntimeError, NotImplementedError):  # no storage to tell views by (no functionalization)
        return "its parameters have no storage to share (not on an XLA device)"
    if not parameters or len(devices) != 1 or next(iter(devices)).type != "xla":
        return "its parameters are not all on one XLA device"
    if run_refusal is not None:
        return run_refusal
    if not all(parameter.dtype == torch.float32 and parameter.layout == torch.strided
               for parameter in parameters):
        return "a parameter is not a dense float32 tensor"
    if len({id(parameter) for parameter in parameters}) != len(parameters):
        return "a parameter is in it twice"
    return _options_refusal(optimizer)


def _options_refusal(optimizer: torch.optim.Optimizer) -> str | None:
    """Why the optimizer's options, as they are now, are not the flat step's (checked every
    step: a schedule or model_fn may change them), or None: plain options, float learning
    rates and betas, no decoupled weight decay (Adam's L2 decay is covered)."""
    decoupled = isinstance(optimizer, torch.optim.AdamW)
    for group in optimizer.param_groups:
        if group["weight_decay"] != 0 and (decoupled or group.get("decoupled_weight_decay")):
            return ("a decoupled weight_decay is set (AdamW): XLA fuses the decay into torch's "
                    "per-parameter update otherwise than into the flat one (a float32 rounding "
                    "apart)")
        if not (all(group.get(key, value) == value for key, value in _FLAT_OPTIONS.items())
                and not group.get("foreach") and not group.get("fused")
                and isinstance(group["lr"], float)
                and not isinstance(group["betas"][0], torch.Tensor)):
            return ("an option it does not cover is set (amsgrad, maximize, capturable, "
                    "differentiable, foreach, fused, or a tensor lr or betas)")
    return None


def _hooks_refusal(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor]) -> str | None:
    """Why code of the user's would run around the step (and change what it computes), or
    None: optimizer step hooks (the optimizer's own, besides the estimator's, or global ones),
    a replaced `optimizer.step`, gradient hooks on a parameter."""
    own = [hook for hook in optimizer._optimizer_step_pre_hooks.values()
           if not getattr(hook, "estimator_own", False)]
    if own or optimizer._optimizer_step_post_hooks or \
            torch_optimizer._global_optimizer_pre_hooks or \
            torch_optimizer._global_optimizer_post_hooks:
        return "optimizer step hooks are registered (they run around torch's step)"
    replaced = vars(optimizer).get("step")
    if replaced is not None and not getattr(replaced, "_wrapped_by_lr_sched", False):
        return "optimizer.step was replaced"
    if any(parameter._backward_hooks or getattr(parameter, "_post_accumulate_grad_hooks", None)
           for parameter in parameters):
        return "a parameter has gradient hooks (they change its gradient after backward)"
    return None


@dataclasses.dataclass
class _Group:
    parameters: list[torch.Tensor]
    weights: torch.Tensor  # every parameter of the group is a view into it
    storage: int  # the weights' storage, which every parameter's data must stay in
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    state_views: list[torch.Tensor] = dataclasses.field(default_factory=list)


def _views(flat: torch.Tensor, parameters: list[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for parameter in parameters:
        views.append(flat[offset:offset + parameter.numel()].view_as(parameter))
        offset += parameter.numel()
    return views


class FlatAdam:
    """Steps a torch Adam/AdamW (see flat_refusal) over flat buffers; its state stays torch's.
    `name` is the optimizer's name in the log lines that say when torch's step runs instead."""

    def __init__(self, optimizer: torch.optim.Optimizer, name: str = "default"):
        self.optimizer, self.name = optimizer, name
        self.groups = []
        self.handed_back = False  # torch's own step from now on
        with torch.no_grad():
            for group in optimizer.param_groups:
                parameters = list(group["params"])
                weights = torch.cat([parameter.detach().reshape(-1) for parameter in parameters])
                for parameter, view in zip(parameters, _views(weights, parameters), strict=True):
                    parameter.data = view
                self.groups.append(_Group(parameters, weights, _storage(weights)))

    def _moments(self, group: _Group) -> None:
        """Points the optimizer's per-parameter moments at views of the group's flat ones:
        zeros on the first step, the loaded values after a load_state_dict."""
        state = self.optimizer.state
        current = [state[parameter].get(name) for name in ("exp_avg", "exp_avg_sq")
                   for parameter in group.parameters]
        if group.state_views and all(value is view for value, view in
                                     zip(current, group.state_views, strict=True)):
            return  # still ours
        group.state_views = []
        for name in ("exp_avg", "exp_avg_sq"):
            if all(name in state[parameter] for parameter in group.parameters):
                flat = torch.cat([state[parameter][name].reshape(-1)
                                  for parameter in group.parameters])
            else:
                flat = torch.zeros_like(group.weights)
            setattr(group, name, flat)
            for parameter, view in zip(group.parameters, _views(flat, group.parameters),
                                       strict=True):
                state[parameter][name] = view
                group.state_views.append(view)
        for parameter in group.parameters:
            state[parameter].setdefault("step", torch.tensor(0.0))

    def _torch_step_needed(self) -> str | None:
        """Why torch's own step must run from now on, if it must: the flat buffers no longer
        hold every parameter, or this step is one the flat formula does not cover."""
        groups = self.optimizer.param_groups
        if len(groups) != len(self.groups) or any(
                len(options["params"]) != len(group.parameters)
                or any(a is not b for a, b in zip(options["params"], group.parameters,
                                                  strict=True))
                for options, group in zip(groups, self.groups, strict=False)):
            return "its parameter groups changed (add_param_group)"
        parameters = [parameter for group in self.groups for parameter in group.parameters]
        if any(_storage(parameter) != group.storage
               for group in self.groups for parameter in group.parameters):
            return "a parameter's data was replaced (param.data = ...)"
        if any(parameter.grad is None for parameter in parameters):
            return "a parameter has no gradient (frozen, or unused by this step's loss)"
        why = _options_refusal(self.optimizer) or _hooks_refusal(self.optimizer, parameters)
        if why is not None:
            return why
        state = self.optimizer.state  # a defaultdict: read with get, never create entries
        if len({float(state.get(parameter, {}).get("step", 0)) for parameter in parameters}) > 1:
            return "its parameters have taken different numbers of steps"
        return None

    def hand_back(self, reason: str) -> None:
        """Gives every parameter and moment still in a flat buffer storage of its own again,
        computed now, so that torch's step from here on runs exactly as if it had run from the
        start; says why, once."""
        from ..runtime import xla_compat

        if self.handed_back:
            return

        logger.info("flat_optimizer: optimizer %r takes torch's own Adam step from now on, "
                    "because %s", self.name, reason)
        self.handed_back = True
        state, copies = self.optimizer.state, []
        with torch.no_grad():
            for group in self.groups:
                for parameter in group.parameters:
                    if _storage(parameter) == group.storage:
                        parameter.data = parameter.data.clone()
                        copies.append(parameter.data)
                    for name in ("exp_avg", "exp_avg_sq"):
                        moment = state.get(parameter, {}).get(name)
                        if any(moment is view for view in group.state_views):
                            state[parameter][name] = moment.clone()
                            copies.append(state[parameter][name])
        if copies:
            xla_compat.materialize(copies)
        self.groups = []

    @torch.no_grad()
    def step(self) -> None:
        if not self.handed_back:
            reason = self._torch_step_needed()
            if reason is not None:
                self.hand_back(reason)
        if self.handed_back:
            self.optimizer.step()
            return
        for group, options in zip(self.groups, self.optimizer.param_groups, strict=True):
            self._moments(group)
            self._step(group, options)
        # what torch's LR scheduler wrapper of optimizer.step records, so that the scheduler's
        # first step does not warn that the optimizer never stepped
        self.optimizer._opt_called = True

    def _step(self, group: _Group, options: dict) -> None:
        state = self.optimizer.state
        for parameter in group.parameters:
            state[parameter]["step"] += 1
        step = float(state[group.parameters[0]]["step"])
        lr, (beta1, beta2) = options["lr"], options["betas"]
        weight_decay, eps = options["weight_decay"], options["eps"]
        grad = torch.cat([parameter.grad.reshape(-1) for parameter in group.parameters])
        weights = group.weights
        if weight_decay != 0:  # Adam's L2 decay (a decoupled one is refused)
            grad = grad.add(weights, alpha=weight_decay)
        # torch's ops out of place, each buffer written back once: the in-place forms would pass
        # through torch's Python shape checks on every step (see the module docstring)
        exp_avg = torch.lerp(group.exp_avg, grad, 1 - beta1)
        exp_avg_sq = torch.addcmul(group.exp_avg_sq * beta2, grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = exp_avg_sq.sqrt() / bias_correction2**0.5 + eps
        group.exp_avg.copy_(exp_avg)
        group.exp_avg_sq.copy_(exp_avg_sq)
        group.weights.copy_(torch.addcdiv(weights, exp_avg, denom, value=-step_size))


def _shared(optimizers: Mapping[str, torch.optim.Optimizer]) -> set[str]:
    """The optimizers that hold a parameter another one holds too."""
    owners: dict[int, set[str]] = {}
    for name, optimizer in optimizers.items():
        for parameter in [p for group in optimizer.param_groups for p in group["params"]]:
            owners.setdefault(id(parameter), set()).add(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def optimizer_steppers(optimizers: Mapping[str, torch.optim.Optimizer], flat: bool,
                       run_refusal: str | None = None) -> dict[str, Callable[[], None]]:
    """Each optimizer's step: with `flat` (UpdateConfig(flat_optimizer), parameters not
    sharded), FlatAdam's where it gives torch's numbers (flat_refusal), else torch's own; an
    Adam left to torch says why in the log."""
    if not flat:
        return {name: optimizer.step for name, optimizer in optimizers.items()}
    shared = _shared(optimizers)
    if shared:
        logger.info("flat_optimizer: optimizers %s share parameters, so torch's own step "
                    "updates them (one flat buffer per parameter)", sorted(shared))
    steppers = {}
    for name, optimizer in optimizers.items():
        reason = None if name in shared else flat_refusal(optimizer, run_refusal)
        on_xla = all(parameter.device.type == "xla" for group in optimizer.param_groups
                     for parameter in group["params"])
        if reason is not None and on_xla and isinstance(optimizer,
                                                        torch.optim.Adam | torch.optim.AdamW):
            logger.info("flat_optimizer: optimizer %r takes torch's own step, because %s",
                        name, reason)
        flat_step = name not in shared and reason is None
        steppers[name] = FlatAdam(optimizer, name).step if flat_step else optimizer.step
    return steppers
