"""A replica's RunState built from the user's factories: model_init_fn (seeded, so the same
params build the same weights), then, to train, optimizer_fn and the update step."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..input.streams import InputStreams
from ..state.rng import RngState
from ..state.run_state import RunState, unwrap
from .context import ModeContext
from .update import UpdateStep
from .update_state import DEFAULT_OPTIMIZER


def build_module(ctx: ModeContext, rng: RngState, params: dict) -> torch.nn.Module:
    """model_init_fn(params) after seeding, so that the same params build the same weights."""
    rng.seed(ctx.config.seed)
    module = ctx.job.model_init_fn(dict(params))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model_init_fn must return a torch.nn.Module, got {type(module).__name__}")
    return module


def split_optimizer_fn_result(made: Any) -> tuple[dict[str, torch.optim.Optimizer],
                                                  dict[str, Any]]:
    """optimizer_fn's answer (an optimizer, (optimizer, scheduler), or a dict of name -> either)
    as named optimizers and their schedulers (None where there is none)."""
    named = made if isinstance(made, Mapping) else {DEFAULT_OPTIMIZER: made}
    optimizers, schedulers = {}, {}
    for name, value in named.items():
        optimizer, scheduler = value if isinstance(value, tuple) else (value, None)
        if not isinstance(name, str) or not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                "optimizer_fn must return a torch.optim.Optimizer, (optimizer, lr_scheduler), or "
                f"a dict of str names to either; got {type(optimizer).__name__} for {name!r}")
        optimizers[name], schedulers[name] = optimizer, scheduler
    if not optimizers:
        raise TypeError("optimizer_fn returned an empty dict: give at least one optimizer")
    return optimizers, schedulers


def build_run_state(ctx: ModeContext, streams: InputStreams | None = None,
                    batch_size: int | None = None) -> RunState:
    """The module (seeded) on the replica's device, then, to train (`streams` given), its update
    step. model_init_fn's params hold the mode's batch, or `batch_size` (export's largest)."""
    rng = RngState(ctx.replica)
    params = ctx.model_params(batch_size)
    model = ctx.replica.prepare_model(build_module(ctx, rng, params))
    update = None
    if streams is not None:
        optimizers, schedulers = split_optimizer_fn_result(
            ctx.job.optimizer_fn(unwrap(model), dict(params)))
        update = UpdateStep(ctx.replica, unwrap(model), optimizers, schedulers,
                            ctx.config.update_config, replay=ctx.plan.replay_training)
    return RunState(ctx.replica, model, rng, update, streams)
