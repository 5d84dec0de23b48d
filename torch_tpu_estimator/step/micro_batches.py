"""Gradient accumulation's micro-batches (UpdateConfig(accumulation_steps)): a batch cut into
k, and the micro-batches' outputs joined back into one batch's."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

from ..common.tree import map_tensors


def micro_batch(tree: Any, index: int, count: int) -> Any:
    """Rows index, index + count, index + 2 count, ... of every tensor: each replica's block of
    rows gives every micro-batch its share, so an SPMD mesh needs no data movement."""
    return map_tensors(lambda tensor: tensor.reshape(
        tensor.shape[0] // count, count, *tensor.shape[1:])[:, index], tree)


def joined(trees: list[Any]) -> Any:
    """Micro-batches' outputs as one batch's: rows concatenated, scalars averaged."""
    return tree_map(lambda *leaves: (torch.stack(leaves).mean(0) if leaves[0].dim() == 0
                                     else torch.cat(leaves)) if isinstance(leaves[0], torch.Tensor)
                    else leaves[0], *trees)
