"""What the input pipeline hands the loop: host batches of a fixed number of rows, where each
input stream stands after them, and which rows of each global batch this process keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..common.tree import map_tensors, tensors_of
from ..runtime.base import ReplicaContext


@dataclasses.dataclass(frozen=True)
class InputPosition:
    """How far training has read: the pass number and the batches of that pass consumed."""

    epoch: int = 0
    batch: int = 0


@dataclasses.dataclass
class HostBatch:
    """One step's input for this process, and where each of its input streams stands once the
    batch is consumed (keyed by `InputShard.key`)."""

    features: Any
    labels: Any
    num_real: int
    positions: dict[str, InputPosition]


@dataclasses.dataclass(frozen=True)
class InputShard:
    """One input_fn call made in this process, and the rows of its batches that this process keeps.

    batch_size is `params["batch_size"]` of the call: the rows of each batch its data is cut into.
    This process keeps slice `keep_index` of `keep_count` equal slices of every such batch.
    """

    key: str
    context: ReplicaContext
    batch_size: int
    keep_index: int = 0
    keep_count: int = 1

    @property
    def rows(self) -> int:
        """Rows of every batch this process feeds from this call."""
        return self.batch_size // self.keep_count


def split_example(item: Any) -> tuple[Any, Any]:
    """(features, labels) from an example or batch; labels is None for features alone."""
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return item[0], item[1]
        if len(item) == 1:
            return item[0], None
        raise ValueError(
            "input_fn must yield (features, labels) or features, got a sequence of "
            f"{len(item)} items"
        )
    return item, None


def batch_size_of(features: Any, labels: Any) -> int:
    """The leading size shared by every tensor of a batch; a clear error when they disagree."""
    sizes = {tuple(t.shape[:1]) for t in tensors_of((features, labels))}
    if not tensors_of(features):
        raise ValueError(f"input_fn's features hold no tensor: got {type(features).__name__}")
    if len(sizes) != 1 or () in sizes:
        shapes = [tuple(t.shape) for t in tensors_of((features, labels))]
        raise ValueError(
            "features and labels of a batch must share their first (batch) dimension, "
            f"got shapes {shapes}"
        )
    return sizes.pop()[0]


def pad_rows(tree: Any, size: int) -> Any:
    """Pads every tensor along dim 0 to `size` rows by repeating its last row."""

    def pad(tensor: torch.Tensor) -> torch.Tensor:
        missing = size - tensor.shape[0]
        if missing <= 0:
            return tensor
        return torch.cat([tensor, tensor[-1:].expand(missing, *tensor.shape[1:])], dim=0)

    return map_tensors(pad, tree)


def concatenated(streams: list[Iterator[HostBatch]]) -> Iterator[HostBatch]:
    """One batch per step from several local input streams (per-replica input in SPMD), joined
    in replica order along the batch dimension; ends with the shortest stream."""
    if len(streams) == 1:
        yield from streams[0]
        return
    for parts in zip(*streams, strict=False):
        flat = [tree_flatten((part.features, part.labels)) for part in parts]
        joined = [torch.cat(column) for column in zip(*(leaves for leaves, _ in flat), strict=True)]
        features, labels = tree_unflatten(joined, flat[0][1])
        positions = {key: value for part in parts for key, value in part.positions.items()}
        yield HostBatch(features, labels, sum(part.num_real for part in parts), positions)
