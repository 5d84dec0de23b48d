"""Adam and AdamW stepped over one flat buffer per parameter group, on XLA: torch's arithmetic in
a handful of traced ops.

On XLA the host traces every op of a step, and torch.optim.Adam's chain of in-place ops per
parameter, each through torch's Python shape checks, was 75% of a small model's step. Here a
group's parameters become views into one flat buffer and its two moments are flat too: a step
concatenates the gradients once and runs torch's own formula (`_single_tensor_adam`, the
non-capturable path: the same ops in the same order, with the same Python-float bias
corrections) on the three buffers, out of place with one copy back per buffer (XLA runs an
in-place op as its out-of-place form anyway; only the Python checks differ), so the numbers are
bit for bit torch.optim.Adam's (with decoupled weight decay, XLA fuses the decay into the
update differently over one buffer: a float32 rounding apart per step). The optimizer keeps
torch's state layout (each parameter's moments are views of the flat ones, its step a CPU
tensor), so its state_dict, checkpoints and a resume are unchanged; a state loaded from a
checkpoint is copied into the flat buffers at the next step.
"""

from __future__ import annotations

import dataclasses

import torch

_FLAT_OPTIONS = {"amsgrad": False, "maximize": False, "capturable": False,
                 "differentiable": False}


def flattenable(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` is a torch Adam or AdamW this module steps exactly: plain options,
    float learning rates, every parameter a dense float tensor on one XLA device."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    devices = {parameter.device for parameter in parameters}
    return bool(parameters) and len(devices) == 1 and next(iter(devices)).type == "xla" and all(
        all(group.get(key, value) == value for key, value in _FLAT_OPTIONS.items())
        and not group.get("foreach") and not group.get("fused")
        and isinstance(group["lr"], float) and not isinstance(group["betas"][0], torch.Tensor)
        for group in optimizer.param_groups) and all(
        parameter.dtype == torch.float32 and parameter.layout == torch.strided
        for parameter in parameters)


@dataclasses.dataclass
class _Group:
    parameters: list[torch.Tensor]
    weights: torch.Tensor  # every parameter of the group is a view into it
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
    """Steps a torch Adam/AdamW (flattenable) over flat buffers; its state stays torch's."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.decoupled = isinstance(optimizer, torch.optim.AdamW) or any(
            group.get("decoupled_weight_decay") for group in optimizer.param_groups)
        self.groups = []
        with torch.no_grad():
            for group in optimizer.param_groups:
                parameters = list(group["params"])
                weights = torch.cat([parameter.detach().reshape(-1) for parameter in parameters])
                for parameter, view in zip(parameters, _views(weights, parameters), strict=True):
                    parameter.data = view
                self.groups.append(_Group(parameters, weights))

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

    @torch.no_grad()
    def step(self) -> None:
        state = self.optimizer.state
        usable = all(parameter.grad is not None for group in self.groups
                     for parameter in group.parameters)
        steps = {float(state[parameter].get("step", 0)) for group in self.groups
                 for parameter in group.parameters}
        if not usable or len(steps) > 1:  # some parameter sits (or sat) a step out: torch's
            self.optimizer.step()  # own update works on the same views, in place
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
        if weight_decay != 0:
            if self.decoupled:
                weights = weights * (1 - lr * weight_decay)
            else:
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
