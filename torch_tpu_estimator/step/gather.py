"""Host-side assembly of per-replica, per-step outputs into input order, padding removed.

Input pipeline r of N holds the r-th slice of every global batch (see input.py), so for each step
the replicas' real rows, concatenated in replica order, are that global batch's real examples in
input order; steps follow one another.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten


def _combine(leaves: Sequence[torch.Tensor], num_reals: Sequence[int]) -> torch.Tensor:
    if leaves[0].dim() == 0:  # one value per replica: kept where the replica had real examples
        return torch.stack([leaf for leaf, real in zip(leaves, num_reals, strict=True) if real])
    return torch.cat([leaf[:real] for leaf, real in zip(leaves, num_reals, strict=True)])


def real_examples(outputs: Sequence[Sequence[Any]], num_reals: Sequence[Sequence[int]]) -> Any:
    """outputs[r][k] is replica r's output tree at step k, num_reals[r][k] its real rows.

    Returns one tree whose tensors hold every step's real rows in input order (scalars become a
    vector of one value per replica and step that had real examples), or None for no steps.
    """
    steps = len(outputs[0])
    if steps == 0:
        return None
    flat_steps, spec = [], None
    for step in range(steps):
        per_replica = [tree_flatten(replica[step]) for replica in outputs]
        spec = per_replica[0][1]
        reals = [replica[step] for replica in num_reals]
        if not any(reals):
            continue
        flat_steps.append([
            _combine([leaves[i] for leaves, _ in per_replica], reals)
            for i in range(len(per_replica[0][0]))
        ])
    if not flat_steps:
        return None
    return tree_unflatten([torch.cat(column) for column in zip(*flat_steps, strict=True)], spec)
