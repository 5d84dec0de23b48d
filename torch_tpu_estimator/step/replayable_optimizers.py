"""SGD, Adam and AdamW steps whose per-step numbers are device data, for replayed training.

torch's optimizers pass their learning rate, bias corrections and other options to the device
as Python numbers, which torch_xla turns into graph inputs it makes from the value: a replayed
program (train_replay.py) would keep the numbers of the step it was traced at. Here each step's
numbers are computed on the host exactly as torch computes them (Python floats, from the
parameter group's options as the LR scheduler left them and the step count), sent to the device
as one float32 vector per optimizer, and read by the same ops torch runs, op for op: a replayed
step only has to send the next vector. The branches torch takes in Python (weight decay or not,
momentum or not, a momentum buffer yet or not) are the step's structure: a new one is a new
program. The optimizer's state stays torch's (its momentum buffers and moments, its step
counts), so state_dict, checkpoints and resumes are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_PLAIN = {"maximize": False, "differentiable": False, "capturable": False}


def not_replayable(optimizer: torch.optim.Optimizer) -> str | None:
    """Why `optimizer` has no replayable step, or None: it must be a torch SGD, Adam or AdamW
    with torch's single-tensor arithmetic, float learning rates and float32 dense parameters."""
    kind = type(optimizer)
    if kind not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        return f"{kind.__name__} is not one of SGD, Adam, AdamW"
    for group in optimizer.param_groups:
        options = {**_PLAIN, "amsgrad": False} if kind is not torch.optim.SGD else _PLAIN
        changed = [key for key, value in options.items() if group.get(key, value) != value]
        changed += [key for key in ("foreach", "fused") if group.get(key)]
        if changed:
            return f"{kind.__name__} has options {changed} set"
        numbers = [group.get(key, 0.0) for key in ("lr", "momentum", "dampening", "weight_decay",
                                                   "eps")] + list(group.get("betas", ()))
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool)
                   for value in numbers):
            return f"{kind.__name__} has a tensor learning rate or option"
        if not all(parameter.dtype == torch.float32 and parameter.layout == torch.strided
                   and parameter.device.type == "xla" for parameter in group["params"]):
            return f"{kind.__name__} holds parameters that are not dense float32 XLA tensors"
    return None


def options(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each parameter group's options (learning rate, betas...), parameters left out."""
    return [{key: value for key, value in group.items() if key != "params"}
            for group in optimizer.param_groups]


class ReplayableStep:
    """One optimizer's step with its per-step numbers sent as device data. Calling it runs a
    whole step (numbers sent, then the device ops); host_step() does the host's part alone,
    for a replayed step, and returns the vector the replayed program reads."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.adam = not isinstance(optimizer, torch.optim.SGD)
        self.device = optimizer.param_groups[0]["params"][0].device
        self.sent: torch.Tensor | None = None  # the last vector sent
        self._numbers: list[float] = []  # and what it holds
        self.read_options: list[dict] = []  # the groups' options the last traced step read
        # which parameters had a gradient in the last traced step (a replayed one has none)
        self.stepped: list[list[bool]] = []

    def structure(self) -> tuple:
        """The Python branches the step takes and the options it passes as Python numbers,
        which torch_xla bakes into the program (weight decay, dampening, eps): a change is a
        new program."""
        state = self.optimizer.state
        return tuple(
            (group["weight_decay"], group.get("dampening"), group.get("eps"),
             group.get("momentum", 0) != 0, group.get("nesterov", False),
             group.get("decoupled_weight_decay", False),
             tuple("momentum_buffer" in state.get(parameter, {}) or "exp_avg" in
                   state.get(parameter, {}) for parameter in group["params"]))
            for group in self.optimizer.param_groups)

    def host_step(self, traced: bool = False) -> torch.Tensor:
        """Counts the step and sends its numbers: each group's, as torch computes them. A
        traced step notes which parameters have a gradient; a replayed one steps those."""
        if traced:
            self.stepped = [[parameter.grad is not None for parameter in group["params"]]
                            for group in self.optimizer.param_groups]
            self.read_options = options(self.optimizer)
        numbers: list[float] = []
        for group, stepped in zip(self.optimizer.param_groups, self.stepped, strict=True):
            if self.adam:
                numbers += self._adam_numbers(group, stepped)
            else:
                numbers += [group["momentum"], -group["lr"]]
        if numbers != self._numbers:  # a constant learning rate: no transfer a step
            self._numbers = numbers
            self.sent = torch.tensor(numbers, dtype=torch.float32).to(self.device)
        return self.sent

    def _adam_numbers(self, group: dict, stepped: list[bool]) -> list[float]:
        """The group's decoupled decay and betas, then each stepped parameter's bias
        corrections from its own step count (counts differ after a frozen stretch)."""
        state = self.optimizer.state
        lr, (beta1, beta2) = group["lr"], group["betas"]
        decoupled = isinstance(self.optimizer, torch.optim.AdamW) or \
            group.get("decoupled_weight_decay", False)
        numbers = [1 - lr * group["weight_decay"] if decoupled else 0.0, 1 - beta1, beta2,
                   1 - beta2]
        for parameter, has_gradient in zip(group["params"], stepped, strict=True):
            if not has_gradient:
                continue
            slot = state[parameter]
            if "step" not in slot:
                slot["step"] = torch.tensor(0.0)
                slot["exp_avg"] = torch.zeros_like(parameter, memory_format=torch.preserve_format)
                slot["exp_avg_sq"] = torch.zeros_like(parameter,
                                                      memory_format=torch.preserve_format)
            slot["step"] += 1
            step = float(slot["step"])
            numbers += [(1 - beta2**step)**0.5, -(lr / (1 - beta1**step))]
        return numbers

    @torch.no_grad()
    def __call__(self) -> None:
        numbers = self.host_step(traced=True)
        offset = 0
        for group, stepped in zip(self.optimizer.param_groups, self.stepped, strict=True):
            width = 4 + 2 * sum(stepped) if self.adam else 2
            values = [numbers[offset + index] for index in range(width)]
            offset += width
            (self._adam if self.adam else self._sgd)(group, values)
        self.optimizer._opt_called = True  # as torch's step wrapper records for LR schedulers

    def _sgd(self, group: dict, values: list[torch.Tensor]) -> None:
        """torch's _single_tensor_sgd, op for op, its learning rate and momentum read from
        `values`."""
        momentum, negative_lr = values
        for parameter in group["params"]:
            if parameter.grad is None:
                continue
            grad = parameter.grad
            if group["weight_decay"] != 0:
                grad = grad.add(parameter, alpha=group["weight_decay"])
            if group["momentum"] != 0:
                slot = self.optimizer.state[parameter]
                buffer = slot.get("momentum_buffer")
                if buffer is None:
                    slot["momentum_buffer"] = buffer = grad.detach().clone()
                else:
                    buffer.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
                grad = grad.add(buffer * momentum) if group["nesterov"] else buffer
            parameter.add_(grad * negative_lr)

    def _adam(self, group: dict, values: list[torch.Tensor]) -> None:
        """torch's _single_tensor_adam (not capturable), op for op, the numbers that follow the
        learning rate, the betas and the step counts read from `values`."""
        decay, one_minus_beta1, beta2, one_minus_beta2 = values[:4]
        corrections = iter(values[4:])  # two per stepped parameter
        decoupled = isinstance(self.optimizer, torch.optim.AdamW) or \
            group.get("decoupled_weight_decay", False)
        for parameter in group["params"]:
            if parameter.grad is None:
                continue
            bias_correction2_sqrt, negative_step_size = next(corrections), next(corrections)
            grad, slot = parameter.grad, self.optimizer.state[parameter]
            if group["weight_decay"] != 0:
                if decoupled:
                    parameter.mul_(decay)
                else:
                    grad = grad.add(parameter, alpha=group["weight_decay"])
            slot["exp_avg"].lerp_(grad, one_minus_beta1)
            slot["exp_avg_sq"].mul_(beta2).add_((grad * grad) * one_minus_beta2)
            denom = (slot["exp_avg_sq"].sqrt() / bias_correction2_sqrt).add_(group["eps"])
            parameter.add_((slot["exp_avg"] / denom) * negative_step_size)


def replayable_steppers(optimizers: dict[str, torch.optim.Optimizer]
                        ) -> dict[str, Callable[[], None]] | str:
    """A ReplayableStep for each optimizer, or why one of them has none."""
    for name, optimizer in optimizers.items():
        reason = not_replayable(optimizer)
        if reason is not None:
            return f"optimizer {name!r}: {reason}"
    return {name: ReplayableStep(optimizer) for name, optimizer in optimizers.items()}
