"""A replica's resumable state: its components, and the global step it has reached.

RunState composes the stateful parts of a run: the module, the update step (optional: training
only), this process's input streams (training only) and RNGs. It is restored from a Checkpoint
and captured back into the tree the checkpoint schema names (schema.py); each component says
what it keeps. RunState owns the global step: it advances it, one batch at a time, and everyone
else reads it here. step/building.py builds a RunState from the user's factories.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from ..runtime.base import Replica
from .rng import RngState
from .schema import FORMAT, Checkpoint, Layout


class UpdateComponent(Protocol):
    """What RunState needs of the update step (step/update.py)."""

    def state_dict(self) -> Any: ...

    def restore(self, saved: Checkpoint, in_place: bool) -> None: ...


class StreamsComponent(Protocol):
    """What RunState needs of the input streams (input/streams.py)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def consumed(self, batch: Any) -> None: ...


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a wrapper (FSDP) that holds it as `.module`."""
    return getattr(model, "module", model)


def load_weights(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
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
            f"unexpected keys {list(result.unexpected_keys)}")


def layout_of(tree: Any) -> Layout:
    """Where a checkpoint's part loads in place: the tensor at the same path of `tree` (a
    component's own state), when there is one."""
    def at(path: tuple) -> torch.Tensor | None:
        value = tree
        for key in path:
            if isinstance(value, Mapping) and key in value:
                value = value[key]
            elif isinstance(value, (list, tuple)) and isinstance(key, int) and key < len(value):
                value = value[key]
            else:
                return None
        return value if isinstance(value, torch.Tensor) else None
    return at


class RunState:
    """The stateful parts of a run on one replica, as one resumable whole."""

    def __init__(self, replica: Replica, model: torch.nn.Module, rng: RngState,
                 update: UpdateComponent | None = None, streams: StreamsComponent | None = None):
        self.replica, self.model, self.rng = replica, model, rng
        self.update, self.streams = update, streams
        self.global_step = 0

    def advance(self, batch: Any) -> None:
        """One step done on `batch`: the global step grows and the input resumes after it."""
        self.global_step += 1
        if self.streams is not None:
            self.streams.consumed(batch)

    @property
    def _in_place(self) -> bool:
        """Whether checkpoints load into the run's own tensors, shard by shard (parameters
        sharded over devices)."""
        return self.replica.shards_parameters

    def model_layout(self) -> Layout | None:
        """Where the module's weights load in place, when they do (_in_place)."""
        return layout_of(unwrap(self.model).state_dict()) if self._in_place else None

    def restore(self, saved: Checkpoint) -> None:
        """Continues the run `saved` holds: weights, update state, step, input, RNGs."""
        layout = self.model_layout() if saved.sharded else None
        self.load_weights(saved.part("model", layout=layout), saved)
        if self.update is not None:
            self.update.restore(saved, self._in_place)
        if self.streams is not None:
            self.streams.load_state_dict(saved.input_positions)
        self.rng.load_state_dict(saved.rng_state(self.replica.process_index))

    def load_weights(self, weights: Mapping[str, torch.Tensor], saved: Checkpoint) -> None:
        """Takes `weights` (from `saved`) into the module, and its global step."""
        load_weights(self.model, self.replica.restorable(dict(weights)), saved.path)
        self.global_step = saved.global_step

    def capture(self) -> dict[str, Any] | None:
        """Everything needed to continue this run exactly, on the chief (None elsewhere), as
        the tree the schema names; its tensors still on the device (storage.py writes them). A
        collective: every process calls it, and gives its RNGs and streams."""
        streams = self.streams.state_dict() if self.streams is not None else {}
        gathered = self.replica.host_gather((streams, self.rng.state_dict()))
        if not self.replica.is_chief:
            return None
        return {"format": FORMAT, "global_step": self.global_step,
                "model": unwrap(self.model).state_dict(),
                "update": self.update.state_dict() if self.update is not None else None,
                "input": {key: value for positions, _ in gathered
                          for key, value in positions.items()},
                "rng": [rng for _, rng in gathered]}
