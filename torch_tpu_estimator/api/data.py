"""TensorSlices: tf.data.Dataset.from_tensor_slices for PyTorch.

The rows of a nested structure of tensors (one tensor, a tuple, a dict of named features and a
label tensor, ...) as a map-style Dataset of examples: `TensorSlices(({"image": x, "id": ids},
labels))` yields `({"image": x[i], "id": ids[i]}, labels[i])`. The estimator batches it by
indexing every tensor once per batch, never row by row.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import Dataset


class TensorSlices(Dataset):
    """The rows of every tensor of `tensors`, which must all have as many rows."""

    def __init__(self, tensors: Any):
        leaves, self._spec = tree_flatten(tensors)
        if not leaves or not all(isinstance(leaf, torch.Tensor) and leaf.dim() > 0
                                 for leaf in leaves):
            raise TypeError("TensorSlices takes a tensor or a nested structure (dict, tuple, "
                            "list) of tensors with a first (row) axis")
        rows = {leaf.shape[0] for leaf in leaves}
        if len(rows) != 1:
            raise ValueError(f"TensorSlices' tensors have different row counts: {sorted(rows)}")
        self._leaves = leaves

    def __len__(self) -> int:
        return self._leaves[0].shape[0]

    def __getitem__(self, index: int) -> Any:
        return tree_unflatten([leaf[index] for leaf in self._leaves], self._spec)

    def rows(self, index: torch.Tensor) -> Any:
        """The examples at `index` (a 1-D int64 tensor) as one batch, one gather per tensor."""
        return tree_unflatten([torch.index_select(leaf, 0, index) for leaf in self._leaves],
                              self._spec)
