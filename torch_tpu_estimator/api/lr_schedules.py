"""TF's learning-rate decays as torch LR schedulers, stepped once per training step.

`optimizer_fn` returns `(optimizer, schedule)`; the estimator steps the schedule after every
optimizer step and checkpoints it. They compute TF's formulas exactly (tf.compat.v1.train.
exponential_decay, polynomial_decay, and BERT's linear warmup before a polynomial decay).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler


class ExponentialDecay(LRScheduler):
    """lr = base_lr * decay_rate ** (step / decay_steps); with `staircase`, the exponent is
    rounded down, so the rate changes every decay_steps steps."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay_steps: int, decay_rate: float,
                 staircase: bool = False, last_epoch: int = -1):
        if decay_steps <= 0:
            raise ValueError(f"decay_steps must be positive, got {decay_steps}")
        self.decay_steps, self.decay_rate, self.staircase = decay_steps, decay_rate, staircase
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        exponent = self.last_epoch / self.decay_steps
        if self.staircase:
            exponent = math.floor(exponent)
        return [base * self.decay_rate ** exponent for base in self.base_lrs]


class PolynomialDecay(LRScheduler):
    """lr decays from base_lr to end_learning_rate over decay_steps steps as
    (1 - step / decay_steps) ** power, then stays there. With `warmup_steps`, the first steps
    rise linearly from 0 to base_lr first (BERT's schedule: power 1, end 0)."""

    def __init__(self, optimizer: torch.optim.Optimizer, decay_steps: int,
                 end_learning_rate: float = 0.0001, power: float = 1.0, warmup_steps: int = 0,
                 last_epoch: int = -1):
        if decay_steps <= 0 or warmup_steps < 0:
            raise ValueError(f"decay_steps must be positive and warmup_steps >= 0, got "
                             f"{decay_steps} and {warmup_steps}")
        self.decay_steps, self.end_learning_rate = decay_steps, end_learning_rate
        self.power, self.warmup_steps = power, warmup_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        step = self.last_epoch
        if step < self.warmup_steps:
            return [base * step / self.warmup_steps for base in self.base_lrs]
        fraction = 1.0 - min(step, self.decay_steps) / self.decay_steps
        return [(base - self.end_learning_rate) * fraction ** self.power + self.end_learning_rate
                for base in self.base_lrs]
