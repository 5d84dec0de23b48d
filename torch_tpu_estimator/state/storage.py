"""Where a checkpoint's tree goes: the one strategy that decides how a run's state is stored.

The tree is what RunState.capture gives: nested dicts and lists of tensors and plain values,
opened by no one here. When none of its tensors is sharded over devices it is one file, a
`torch.save` of the tree brought to the host in one transfer, read back with torch's
weights-only reader (never unpickling objects) and mapped into memory. When some are (FSDPv2,
manual sharding), it is a directory: every XLA tensor of one or more dimensions goes to DCP
(sharded.py), each device writing its own shards, under its path in the tree ("model/layer.w",
"update/optimizers/default/state/0/exp_avg"); the rest of the tree is `state.pt`, with a marker
where each such tensor was. Reading resolves the markers: into the run's own tensors in place
when it gives a layout (each device reads its shards), else as whole CPU tensors.

Both are written unseen and published whole (files.py): a crash leaves no half checkpoint
under a checkpoint's name.
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..common.paths import regular_file
from . import sharded
from .files import atomic_directory, atomic_write

REST_NAME = "state.pt"  # a sharded checkpoint's tree, markers where DCP holds the tensors
_MARKER = "<sharded tensor {}>"
_MARKER_HEAD, _MARKER_TAIL = _MARKER.split("{}")

Tree = Any
Path = tuple[Any, ...]


def marker(key: str) -> str:
    """What stands in a sharded checkpoint's state.pt where DCP holds the tensor `key`."""
    return _MARKER.format(key)


def marker_key(value: Any) -> str | None:
    """The DCP key a marker stands for, or None when `value` is not a marker."""
    if isinstance(value, str) and value.startswith(_MARKER_HEAD) and value.endswith(_MARKER_TAIL):
        return value[len(_MARKER_HEAD):len(value) - len(_MARKER_TAIL)]
    return None


def leaves(tree: Tree, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every leaf of nested dicts, lists and tuples, with its path of keys and indices."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from leaves(value, (*path, key))
    elif isinstance(tree, (list, tuple)):
        for index, value in enumerate(tree):
            yield from leaves(value, (*path, index))
    else:
        yield path, tree


def replaced(tree: Tree, leaf: Callable[[Path, Any], Any], path: Path = ()) -> Tree:
    """`tree` with every leaf replaced by leaf(path, value)."""
    if isinstance(tree, dict):
        return {key: replaced(value, leaf, (*path, key)) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(replaced(value, leaf, (*path, index)) for index, value in
                          enumerate(tree))
    return leaf(path, tree)


def key_of(path: Path) -> str:
    """A tensor's DCP key: its path in the tree."""
    return "/".join(str(part) for part in path)


def _on_devices(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "xla" and value.dim() > 0


def is_sharded(tree: Tree) -> bool:
    """Whether some tensor of the tree is split over devices (then it is stored sharded)."""
    device_tensors = [value for _, value in leaves(tree) if _on_devices(value)]
    if not device_tensors:
        return False
    from ..runtime import xla_compat  # XLA tensors: torch_xla is loaded already

    return any(xla_compat.sharding_of(tensor) not in ("", "{replicated}")
               for tensor in device_tensors)


def _on_host(tree: Tree, to_host: Callable[[Tree], Tree]) -> Tree:
    """`tree` with its device tensors copied to the host, all in one transfer; the rest, and
    the tree's own containers, as they are."""
    on_device = {leaf_path: value for leaf_path, value in leaves(tree)
                 if isinstance(value, torch.Tensor) and value.device.type != "cpu"}
    copied = dict(zip(on_device, to_host(list(on_device.values())), strict=True))
    return replaced(tree, lambda leaf_path, value: copied.get(leaf_path, value))


def write(path: str, tree: Tree, to_host: Callable[[Tree], Tree]) -> str:
    """Writes `tree` at `path` (a file, or a directory when is_sharded(tree)) unseen, then
    publishes it by a rename; returns its SHA-256. `to_host` brings tensors to the host in one
    transfer."""
    if not is_sharded(tree):
        host_tree = _on_host(tree, to_host)
        return atomic_write(path, lambda handle: torch.save(host_tree, handle))
    tensors = {key_of(leaf_path): value for leaf_path, value in leaves(tree)
               if _on_devices(value)}
    rest = _on_host(replaced(tree, lambda leaf_path, value: marker(key_of(leaf_path))
                             if _on_devices(value) else value), to_host)

    def write_directory(directory: str) -> None:
        sharded.write(directory, tensors)
        torch.save(rest, os.path.join(directory, REST_NAME))

    return atomic_directory(path, write_directory)


def load_file(path: str) -> Tree:
    """Maps a checkpoint file into CPU memory with torch.load's weights-only reader (plain
    tensors and Python values, never arbitrary objects). Its tensors are views of the mapped
    file: reading one reads its pages only."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path!r}")
    try:
        with warnings.catch_warnings():  # torch's notes on a file that is not ours: noise
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        raise ValueError(f"checkpoint {path!r} cannot be read (truncated, corrupt or not "
                         f"readable): {error}") from error


def read_outline(path: str) -> Tree:
    """A checkpoint's tree as stored: a sharded one's with its markers, no shard read."""
    if os.path.isdir(path):
        return load_file(regular_file(path, REST_NAME, f"sharded checkpoint {path}"))
    return load_file(path)


def resolve(path: str, outline: Tree, layout: Callable[[Path], torch.Tensor | None]) -> Tree:
    """`outline` (part of a checkpoint's tree) with each marker replaced by its tensor:
    read in place into layout(path) when the run gives a tensor there (each device its own
    shards, resharded to the run's layout), else read whole into CPU memory."""
    wanted = {key: path_ for path_, value in leaves(outline)
              if (key := marker_key(value)) is not None}
    if not wanted:
        return outline
    specs = sharded.tensor_specs(path)
    targets = {}
    for key, leaf_path in wanted.items():
        target = layout(leaf_path)
        if target is None:
            dtype, size = specs.get(key, (None, None))
            if dtype is None:
                raise ValueError(f"sharded checkpoint {path!r} holds no tensor {key!r}")
            target = torch.empty(size, dtype=dtype)
        targets[key] = target
    sharded.read_into(path, targets)
    return replaced(outline, lambda leaf_path, value: targets[key]
                    if (key := marker_key(value)) is not None else value)


def tensor_specs(path: str, outline: Tree) -> dict[Path, tuple[torch.dtype, tuple[int, ...]]]:
    """Each tensor's dtype and shape, by path, without reading a sharded checkpoint's data."""
    specs = sharded.tensor_specs(path) if os.path.isdir(path) else {}
    found = {}
    for leaf_path, value in leaves(outline):
        if isinstance(value, torch.Tensor):
            found[leaf_path] = (value.dtype, tuple(value.shape))
        elif (key := marker_key(value)) is not None and key in specs:
            found[leaf_path] = (specs[key][0], tuple(specs[key][1]))
    return found
