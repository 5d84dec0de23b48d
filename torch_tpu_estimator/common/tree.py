"""Mapping over the tensors of nested batches (dicts, lists, tuples), as batches come from users."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map_only


def map_tensors(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Applies fn to every tensor in tree and keeps the structure."""
    return tree_map_only(torch.Tensor, fn, tree)


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """Every tensor in tree, in a fixed order."""
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]
