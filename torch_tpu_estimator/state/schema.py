"""The checkpoint schema, and its one reader.

FORMAT 3: {"format": 3, "global_step": int, "model": the module's state_dict, "update": the
update step's state_dict (None outside training), "input": {stream: {"epoch", "batch"}}, "rng":
[one per process]}. The schema names these components and opens none of them: what "update"
holds is the update step's business (step/update.py, read by step/update_state.py), and where
tensors go is storage.py's. Checkpoints of formats 1
(0.1) and 2 (0.2) kept the update's parts at the top level: read as format 3, every top-level key
the schema does not name goes into "update" as it was, with "legacy_format" saying which (the
update step reads it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import sharded, storage
from .stores import store_for

FORMAT = 3
COMPONENTS = ("model", "update", "input", "rng")
Layout = Callable[[tuple], "torch.Tensor | None"]  # where a part's tensors load in place
LEGACY_SHARDED = "<in the sharded tensors>"  # where 0.2 wrote a tensor held by DCP
_NAMED = ("format", "global_step", "model", "input", "input_position", "input_positions", "rng")


class Checkpoint:
    """A checkpoint's contents. Its tree is read when the checkpoint is loaded, a sharded
    checkpoint's without its shards (markers stand for them); part() reads those when asked."""

    def __init__(self, path: str, tree: Mapping[str, Any]):
        self.path, self._tree = path, tree
        self.sharded = os.path.isdir(path)

    @classmethod
    def load(cls, path: str) -> Checkpoint:
        """Reads and checks the checkpoint at `path` (a ValueError naming it when it is not
        one)."""
        path = store_for(path).local_copy(path)  # a bucket's checkpoint: downloaded once
        return cls(path, _upgraded(storage.read_outline(path), path,
                                   lambda: _sharded_keys(path)))

    def sharded_keys(self) -> list[str]:
        """The keys of the tensors a sharded checkpoint holds in DCP (none for one file)."""
        return _sharded_keys(self.path)

    @property
    def global_step(self) -> int:
        return self._tree["global_step"]

    def outline(self, *keys: Any) -> Any:
        """Part of the tree as stored (`outline("update")`): tensors of a file checkpoint are
        mapped, not read; a sharded one's are markers."""
        tree = self._tree
        for key in keys:
            tree = tree[key]
        return tree

    def part(self, *keys: Any, layout: Layout | None = None) -> Any:
        """Part of the tree with its tensors (resolve of its outline)."""
        return self.resolve(self.outline(*keys), layout)

    def resolve(self, outline: Any, layout: Layout | None = None) -> Any:
        """An outline with its tensors: a sharded checkpoint's read into layout(path) in place
        where the run gives a tensor (path from the outline's root), else whole on the host.
        A ValueError names the checkpoint when a shard cannot be read."""
        try:
            return storage.resolve(self.path, outline, layout or (lambda path: None))
        except (RuntimeError, OSError) as error:
            raise ValueError(f"sharded checkpoint {self.path!r} cannot be read: {error}") \
                from None

    def tensor_specs(self, *keys: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """The dtypes and shapes of a part's tensors by name (its first key below the part),
        without reading a sharded checkpoint's data."""
        specs = storage.tensor_specs(self.path, self.outline(*keys))
        return {str(path[0]): spec for path, spec in specs.items() if len(path) == 1}

    @property
    def input_positions(self) -> dict[str, dict[str, int]]:
        return self._tree["input"]

    def rng_state(self, process_index: int) -> dict[str, Any]:
        """A process's RNG states; a process the checkpoint has none for (fewer processes wrote
        it) takes the chief's."""
        states = self._tree["rng"]
        return states[process_index] if process_index < len(states) else states[0]


def _sharded_keys(path: str) -> list[str]:
    return list(sharded.tensor_specs(path)) if os.path.isdir(path) else []


def _model_of_format_2(model: Any, legacy_keys: Callable[[], list[str]]) -> Any:
    """0.2 wrote a sharded checkpoint's model as one marker, its tensors as "model/<key>"."""
    if model != LEGACY_SHARDED:
        return model
    return {key.removeprefix("model/"): storage.marker(key) for key in legacy_keys()
            if key.startswith("model/")}


def _upgraded(tree: Any, path: str, legacy_keys: Callable[[], list[str]]) -> dict:
    """A loaded checkpoint's tree in format 3, its components checked."""
    if not isinstance(tree, dict):
        raise ValueError(f"{path!r} is not a torch_tpu_estimator checkpoint")
    version = tree.get("format", 1)
    if version in (1, 2):
        update = {key: value for key, value in tree.items() if key not in _NAMED}
        tree = {"format": FORMAT, "global_step": tree.get("global_step"),
                "model": _model_of_format_2(tree.get("model"), legacy_keys),
                "update": {"legacy_format": version, **update} if update else None,
                "input": tree.get("input") if version == 2 else (
                    tree.get("input_positions") or {"host": tree.get("input_position", {})}),
                "rng": tree.get("rng") if isinstance(tree.get("rng"), list) else [tree.get("rng")]}
    elif version != FORMAT:
        raise ValueError(f"checkpoint {path!r} has format {version!r}; this version of "
                         f"torch_tpu_estimator reads formats 1 to {FORMAT}")
    missing = [component for component in COMPONENTS if component not in tree]
    if missing:
        raise ValueError(f"checkpoint {path!r} lacks its components {missing}")
    if not isinstance(tree.get("model"), dict):
        raise ValueError(f"{path!r} is not a torch_tpu_estimator checkpoint: it holds no "
                         "'model' state dict")
    step = tree.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint {path!r} has global_step {step!r}: expected an int >= 0")
    for name, value in tree["model"].items():
        if not isinstance(name, str) or not (isinstance(value, torch.Tensor)
                                             or storage.marker_key(value) is not None):
            raise ValueError(f"checkpoint {path!r} holds {name!r} of type "
                             f"{type(value).__name__} in its model state: expected tensors")
    for key, kind in (("input", dict), ("rng", list)):
        if not isinstance(tree.get(key), kind):
            raise ValueError(f"checkpoint {path!r} has no {kind.__name__} {key!r}")
    return tree
