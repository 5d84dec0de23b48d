"""A replica's resumable state, and the checkpoint schema it is written in.

RunState composes the stateful parts of a run, each with state_dict / load_state_dict: the
module, the update step (optimizers, schedulers, EMA), this process's RNGs and its input
streams. It is built from the user's factories inside a replica, restored from a Checkpoint and
captured back into one. Checkpoint is the one reader of the schema: the estimator, `inspect`
and export read checkpoints through its typed accessors and never touch raw keys.

Schema (FORMAT 2): {"format", "global_step", "model", "ema", "optimizers": {name: state},
"schedulers": {name: state | None}, "input": {stream: {"epoch", "batch"}}, "rng": [one per
process]}. Checkpoints of format 1 (no "format" key; one "optimizer" and "scheduler") are read
as format 2. A sharded checkpoint (parameters sharded over an SPMD mesh) is a directory: its
tensors (model, EMA, optimizer slots) go through DCP (sharded_checkpoint.py) under the names
"model/<key>", "ema/<key>", "optimizers/<name>/<param index>/<slot>", each device writing its
own shards; everything else is the same schema in `state.pt`, with SHARDED where a tensor was.
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..common.paths import regular_file
from ..runtime.base import Replica
from ..step.update import DEFAULT_OPTIMIZER, UpdateStep, split_optimizer_fn_result
from . import checkpoint as files
from . import sharded as sharded_checkpoint

if TYPE_CHECKING:
    from ..input.streams import InputStreams
    from ..step.context import ModeContext

FORMAT = 2
SHARDED = "<in the sharded tensors>"  # in state.pt, where DCP holds the tensor
REST_NAME = "state.pt"


class Checkpoint:
    """A checkpoint's contents, read through typed accessors. A sharded checkpoint's tensors
    are read from its directory when first asked for, as whole CPU tensors (for one device,
    plain PyTorch, export, inspect); RunState.restore loads them shard by shard instead."""

    def __init__(self, path: str, state: Mapping[str, Any]):
        self.path = path
        self._state = state
        self.sharded = os.path.isdir(path)

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        """Reads and checks the checkpoint at `path` (a ValueError naming it when it is not one)."""
        if os.path.isdir(path):
            rest = files.load_checkpoint(regular_file(path, REST_NAME, f"sharded checkpoint {path}"))
            if isinstance(rest, dict) and _is_sharded(rest.get("model")):
                rest = {**rest, "model": {}}  # checked against the DCP metadata when read
            return cls(path, _upgraded(rest, path))
        return cls(path, _upgraded(files.load_checkpoint(path), path))

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        try:
            return sharded_checkpoint.read_full(self.path, prefix)
        except (RuntimeError, OSError, ValueError) as error:
            raise ValueError(f"sharded checkpoint {self.path!r} cannot be read: {error}") from None

    @property
    def global_step(self) -> int:
        return self._state["global_step"]

    @functools.cached_property
    def model_weights(self) -> dict[str, torch.Tensor]:
        return self._tensors("model/") if self.sharded else self._state["model"]

    @property
    def has_ema(self) -> bool:
        return self._state.get("ema") is not None

    @functools.cached_property
    def ema_weights(self) -> dict[str, torch.Tensor] | None:
        if _is_sharded(self._state.get("ema")):
            return self._tensors("ema/")
        return self._state.get("ema")

    def tensor_specs(self) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The model's tensors' dtypes and shapes, without reading a sharded checkpoint's data."""
        if not self.sharded:
            return {name: (value.dtype, tuple(value.shape))
                    for name, value in self.model_weights.items()}
        return {name.removeprefix("model/"): (dtype, tuple(size)) for name, (dtype, size) in
                sharded_checkpoint.tensor_specs(self.path).items() if name.startswith("model/")}

    def inference_weights(self, prefer_ema: bool) -> dict[str, torch.Tensor]:
        """The weights evaluate, predict and export use: the EMA's when asked for and kept."""
        return self.ema_weights if prefer_ema and self.ema_weights is not None else \
            self.model_weights

    @property
    def optimizer_names(self) -> list[str]:
        return sorted(self._state["optimizers"])

    @property
    def scheduler_names(self) -> list[str]:
        return sorted(name for name, state in self._state["schedulers"].items() if state)

    def update_state(self) -> dict[str, Any]:
        """What UpdateStep.load_state_dict takes (a sharded checkpoint's tensors read whole)."""
        optimizers = self._state["optimizers"]
        if self.sharded:
            slots = self._tensors("optimizers/")
            optimizers = _filled(optimizers, {f"optimizers/{key}": value
                                              for key, value in slots.items()})
        return {"optimizers": optimizers, "schedulers": self._state["schedulers"],
                "ema": self.ema_weights}

    def load_update_in_place(self, update: UpdateStep) -> None:
        """A sharded checkpoint's update state loaded into a sharded run's own tensors, each
        device reading its shards (the optimizers are primed first, so that their slots
        exist to load into)."""
        from torch_xla.experimental.distributed_checkpoint import prime_optimizer

        targets = {}
        for name, optimizer in update.optimizers.items():
            prime_optimizer(optimizer)
            targets.update(_slots(name, optimizer.state_dict()))
        ema_in_place = update.ema is not None and _is_sharded(self._state.get("ema"))
        if ema_in_place:
            targets.update({f"ema/{key}": value for key, value in update.ema.shadow.items()})
        sharded_checkpoint.read_into(self.path, targets)
        update.load_state_dict({
            "optimizers": _filled(self._state["optimizers"], targets),
            "schedulers": self._state["schedulers"],
            "ema": update.ema.state_dict() if ema_in_place else None})

    @property
    def input_positions(self) -> dict[str, dict[str, int]]:
        return self._state["input"]

    def rng_state(self, process_index: int) -> dict[str, Any]:
        """A process's RNG states; a process the checkpoint has none for (fewer processes wrote
        it) takes the chief's."""
        states = self._state["rng"]
        return states[process_index] if process_index < len(states) else states[0]


def _slot_key(name: str, index: Any, slot: str) -> str:
    """Where a sharded checkpoint holds slot `slot` of parameter `index` of optimizer `name`."""
    return f"optimizers/{name}/{index}/{slot}"


def _slots(name: str, optimizer_state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """An optimizer's tensors of one or more dimensions (sharded like their parameters), named
    as a sharded checkpoint holds them."""
    return {_slot_key(name, index, slot): value
            for index, slots in optimizer_state["state"].items()
            for slot, value in slots.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0}


def _filled(optimizers: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> dict:
    """Optimizer states from state.pt with each SHARDED slot replaced by its tensor in `tensors`
    (keyed as _slot_key names them)."""
    return {name: {**state, "state": {
        index: {slot: tensors[_slot_key(name, index, slot)] if _is_sharded(value) else value
                for slot, value in slots.items()}
        for index, slots in state["state"].items()}}
        for name, state in optimizers.items()}


def _is_sharded(value: Any) -> bool:
    return isinstance(value, str) and value == SHARDED


def _upgraded(state: Any, path: str) -> dict:
    """A loaded checkpoint in the current format, its keys checked."""
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path!r} is not a torch_tpu_estimator checkpoint: it holds no "
                         "'model' state dict")
    step = state.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint {path!r} has global_step {step!r}: expected an int >= 0")
    for name, value in state["model"].items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"checkpoint {path!r} holds {name!r} of type "
                             f"{type(value).__name__} in its model state: expected tensors")
    version = state.get("format", 1)
    if version == 1:
        positions = state.get("input_positions")
        if positions is None:  # written before input streams had names: the per-host stream
            positions = {"host": state.get("input_position", {})}
        state = {"format": FORMAT, "global_step": state["global_step"], "model": state["model"],
                 "ema": None, "optimizers": {DEFAULT_OPTIMIZER: state["optimizer"]}
                 if state.get("optimizer") is not None else {},
                 "schedulers": {DEFAULT_OPTIMIZER: state.get("scheduler")},
                 "input": positions,
                 "rng": state["rng"] if isinstance(state["rng"], list) else [state["rng"]]}
    elif version != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {version!r}; this version of "
                         f"torch_tpu_estimator reads formats 1 and {FORMAT}")
    for key, kind in (("optimizers", dict), ("schedulers", dict), ("input", dict),
                      ("rng", list)):
        if not isinstance(state.get(key), kind):
            raise ValueError(f"checkpoint {path!r} has no {kind.__name__} {key!r}")
    return state


class RngState:
    """This process's random generators: Python, NumPy, torch, CUDA and the XLA device seed."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def seed(self, seed: int) -> None:
        """Seeds every generator; the only place a run's RNGs are seeded. Every replica draws
        from the same seed, as Accelerate's set_seed and Lightning's seed_everything do:
        per-host input relies on input_fn seeing the same RNG everywhere."""
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        self.replica.set_device_rng_state(seed)

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        return {
            "python": random.getstate(),
            "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "numpy_pos": numpy_state["state"]["pos"],
            "numpy_gauss": (numpy_state["has_gauss"], numpy_state["gauss"]),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "device": self.replica.get_device_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        random.setstate(state["python"])
        has_gauss, gauss = state["numpy_gauss"]
        np.random.set_state({
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32),
                      "pos": state["numpy_pos"]},
            "has_gauss": has_gauss, "gauss": gauss})
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        self.replica.set_device_rng_state(state["device"])


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


def build_module(ctx: ModeContext, rng: RngState, params: dict) -> torch.nn.Module:
    """model_init_fn(params) after seeding, so that the same params build the same weights."""
    rng.seed(ctx.config.seed)
    module = ctx.job.model_init_fn(dict(params))
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"model_init_fn must return a torch.nn.Module, got {type(module).__name__}")
    return module


class RunState:
    """The stateful parts of a run on one replica, as one resumable whole."""

    def __init__(self, ctx: ModeContext, model: torch.nn.Module, rng: RngState,
                 update: UpdateStep | None = None, streams: InputStreams | None = None):
        self.ctx, self.model, self.rng, self.update, self.streams = ctx, model, rng, update, streams
        self.global_step = 0

    @classmethod
    def build(cls, ctx: ModeContext, streams: InputStreams | None = None,
              batch_size: int | None = None) -> RunState:
        """Builds the module (seeded) on the replica's device, then, to train, its update step.
        model_init_fn's params hold the mode's batch, or `batch_size` (export's largest)."""
        rng = RngState(ctx.replica)
        params = ctx.model_params(batch_size)
        model = ctx.replica.prepare_model(build_module(ctx, rng, params))
        update = None
        if streams is not None:
            optimizers, schedulers = split_optimizer_fn_result(
                ctx.job.optimizer_fn(unwrap(model), dict(params)))
            update = UpdateStep(ctx.replica, unwrap(model), optimizers, schedulers,
                                ctx.config.update_config)
        return cls(ctx, model, rng, update, streams)

    @property
    def _in_place(self) -> bool:
        """Whether checkpoints are read and written shard by shard (parameters sharded)."""
        return self.ctx.replica.shards_parameters

    def _load_model_shards(self, saved: Checkpoint, prefix: str) -> None:
        targets = {f"{prefix}{key}": value for key, value in unwrap(self.model).state_dict().items()}
        try:
            sharded_checkpoint.read_into(saved.path, targets)
        except (RuntimeError, ValueError) as error:
            raise ValueError(f"checkpoint {saved.path!r} cannot be loaded into the model built by "
                             f"model_init_fn: {error}") from None

    def restore(self, saved: Checkpoint) -> None:
        """Continues the run `saved` holds: weights, update state, step, input, RNGs."""
        if saved.sharded and self._in_place:
            self._load_model_shards(saved, "model/")
            if self.update is not None:
                saved.load_update_in_place(self.update)
        else:
            replica = self.ctx.replica
            load_weights(self.model, replica.restorable(saved.model_weights), saved.path)
            if self.update is not None:
                update = saved.update_state()
                if update["ema"] is not None:
                    update["ema"] = replica.restorable(update["ema"])
                self.update.load_state_dict(update)
        if self.streams is not None:
            self.streams.load_state_dict(saved.input_positions)
        self.rng.load_state_dict(saved.rng_state(self.ctx.replica.process_index))
        self.global_step = saved.global_step

    def load_inference_weights(self, saved: Checkpoint) -> None:
        """Takes the weights to evaluate, predict or export with (the EMA's when configured)."""
        use_ema = self.ctx.config.update_config.ema_for_inference
        if saved.sharded and self._in_place:
            self._load_model_shards(saved, "ema/" if use_ema and saved.has_ema else "model/")
        else:
            load_weights(self.model, self.ctx.replica.restorable(saved.inference_weights(use_ema)),
                         saved.path)
        self.global_step = saved.global_step

    def capture(self) -> dict | Callable[[str], None] | None:
        """Everything needed to continue this run exactly, on the chief (None elsewhere): a dict
        in CPU memory (one transfer), or, with sharded parameters, a function that writes a
        sharded checkpoint into a directory (each device's shards straight from the device).
        A collective: every process calls it, and gives its RNGs and streams."""
        replica = self.ctx.replica
        streams = self.streams.state_dict() if self.streams is not None else {}
        gathered = replica.host_gather((streams, self.rng.state_dict()))
        if not replica.is_chief:
            return None
        update = self.update.state_dict() if self.update is not None else {
            "optimizers": {}, "schedulers": {}, "ema": None}
        rest = {"format": FORMAT, "global_step": self.global_step,
                "schedulers": update["schedulers"],
                "input": {key: value for positions, _ in gathered
                          for key, value in positions.items()},
                "rng": [rng for _, rng in gathered]}
        if not self._in_place:
            device_state = replica.to_host({"model": unwrap(self.model).state_dict(),
                                            "optimizers": update["optimizers"],
                                            "ema": update["ema"]})
            return {**rest, **device_state}
        tensors = {f"model/{key}": value for key, value in unwrap(self.model).state_dict().items()}
        for name, state in update["optimizers"].items():
            tensors.update(_slots(name, state))
        if update["ema"] is not None:
            tensors.update({f"ema/{key}": value for key, value in update["ema"].items()})
        rest.update(model=SHARDED, ema=SHARDED if update["ema"] is not None else None,
                    optimizers=replica.to_host({name: {**state, "state": {
                        index: {slot: SHARDED if _slot_key(name, index, slot) in tensors
                                else value for slot, value in slots.items()}
                        for index, slots in state["state"].items()}}
                        for name, state in update["optimizers"].items()}))

        def write(directory: str) -> None:
            sharded_checkpoint.write(directory, tensors)
            torch.save(rest, os.path.join(directory, REST_NAME))

        return write
