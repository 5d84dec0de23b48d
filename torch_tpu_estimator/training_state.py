"""The stateful parts of a run on one replica: module, optimizer, LR scheduler, step, RNGs, input.

Built by the user's factories from `params`, then restored from a checkpoint (or warm started)
and captured back into a checkpoint's plain, CPU-side form.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .input import InputPosition
from .runtime.base import Runtime

ModelInitFn = Callable[[dict], torch.nn.Module]
OptimizerFn = Callable[[torch.nn.Module, dict], Any]


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch so that model_init_fn builds the same weights every time."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _capture_host_rng() -> dict:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": numpy_state["state"]["pos"],
        "numpy_gauss": (numpy_state["has_gauss"], numpy_state["gauss"]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def capture_rng(runtime: Runtime) -> dict:
    """This process's host RNG states and its device RNG seed, as plain CPU values."""
    state = _capture_host_rng()
    state["device"] = runtime.get_device_rng_state()
    return state


def _restore_host_rng(state: dict) -> None:
    random.setstate(state["python"])
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        "has_gauss": has_gauss,
        "gauss": gauss,
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_module(model_init_fn: ModelInitFn, params: dict, seed: int) -> torch.nn.Module:
    """Calls model_init_fn after seeding, so that the same params build the same weights."""
    seed_everything(seed)
    module = model_init_fn(dict(params))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model_init_fn must return a torch.nn.Module, got {type(module).__name__}")
    return module


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a wrapper such as DistributedDataParallel."""
    return getattr(model, "module", model)


def load_model_weights(model: torch.nn.Module, weights: dict, source: str) -> None:
    """Loads a state dict, naming the missing and unexpected keys when it does not fit."""
    try:
        result = unwrap(model).load_state_dict(weights, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise ValueError(f"checkpoint {source!r} does not fit the model built by "
                         f"model_init_fn: {error}") from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {source!r} does not fit the model built by model_init_fn: "
            f"missing keys {list(result.missing_keys)}, "
            f"unexpected keys {list(result.unexpected_keys)}"
        )


@dataclasses.dataclass
class TrainingState:
    """What a training replica holds between steps."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    scheduler: Any | None
    global_step: int = 0
    positions: dict[str, InputPosition] = dataclasses.field(default_factory=dict)

    @classmethod
    def build(
        cls,
        runtime: Runtime,
        model_init_fn: ModelInitFn,
        optimizer_fn: OptimizerFn | None,
        params: dict,
        seed: int,
    ) -> TrainingState:
        """Builds the module (seeded) on the replica's device, then its optimizer."""
        module = build_module(model_init_fn, params, seed)
        model = runtime.prepare_model(module, training=optimizer_fn is not None)
        optimizer, scheduler = None, None
        if optimizer_fn is not None:
            made = optimizer_fn(unwrap(model), dict(params))
            optimizer, scheduler = made if isinstance(made, tuple) else (made, None)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    "optimizer_fn must return a torch.optim.Optimizer or "
                    f"(optimizer, lr_scheduler), got {type(optimizer).__name__}"
                )
        # Every replica draws from the same seed, as Accelerate's set_seed and Lightning's
        # seed_everything do: per-host input relies on input_fn seeing the same RNG everywhere.
        runtime.set_device_rng_state(seed)
        return cls(model, optimizer, scheduler)

    def restore(self, path: str, runtime: Runtime, weights_only: bool = False) -> int:
        """Loads a checkpoint and returns its global step; `weights_only` takes the module's
        weights and nothing else."""
        state = load_checkpoint(path)
        load_model_weights(self.model, state["model"], path)
        if weights_only:
            return state["global_step"]
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.global_step = state["global_step"]
        positions = state.get("input_positions")
        if positions is None:  # written before input streams had names: the one per-host stream
            positions = {"host": state.get("input_position", {})}
        self.positions = {key: InputPosition(**value) for key, value in positions.items()}
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        # a process the checkpoint has no state for (fewer processes wrote it) takes the chief's
        own = rngs[runtime.process_index] if runtime.process_index < len(rngs) else rngs[0]
        _restore_host_rng(own)
        runtime.set_device_rng_state(own["device"])
        return self.global_step

    def capture(self, runtime: Runtime, positions: dict[str, InputPosition],
                rngs: list[dict]) -> dict:
        """Everything needed to continue this run exactly, in CPU memory (one device transfer).

        `positions` holds every input stream's position and `rngs` every process's RNG states
        (from capture_rng), both gathered from all processes.
        """
        device_state = runtime.to_host({
            "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer else None,
        })
        return {
            "global_step": self.global_step,
            "model": device_state["model"],
            "optimizer": device_state["optimizer"],
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "input_positions": {key: dataclasses.asdict(value) for key, value in positions.items()},
            "rng": rngs,
        }

    def learning_rate(self) -> float:
        if self.optimizer is None:
            return float("nan")
        return float(self.optimizer.param_groups[0]["lr"])
