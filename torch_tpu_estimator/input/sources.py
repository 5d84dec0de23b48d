"""What input_fn may return, and the checks that say what is wrong with anything else: a
Dataset of examples, a DataLoader or iterable of batches, a one-shot iterator, or one batch
returned as it is, as TF's input_fn may return tensors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

from ..api.spec import ModeKeys
from .batches import batch_size_of


def _is_features(value: Any) -> bool:
    return isinstance(value, torch.Tensor) or (
        isinstance(value, Mapping) and bool(value)
        and all(isinstance(item, torch.Tensor) for item in value.values()))


def call_input_fn(input_fn: Callable[[], Any], batch_size: int, mode: str) -> Any:
    """Calls input_fn (its arguments bound) and checks that what it returned is a kind of input
    this module reads. `(features, labels)` or `(features, None)` returned as they are is one
    batch, as TF's input_fn returning tensors is (`tf.data.Dataset.from_tensors`): it must
    not hold more rows than `batch_size` (params["batch_size"]), nor fewer in training."""
    source = input_fn()
    if isinstance(source, tuple) and len(source) == 2 and _is_features(source[0]) and (
            source[1] is None or _is_features(source[1])):
        rows = batch_size_of(*source)
        if rows > batch_size or (rows < batch_size and mode == ModeKeys.TRAIN):
            raise ValueError(
                f"input_fn returned (features, labels) themselves, which is one batch (as a TF "
                f"input_fn returning tensors), of {rows} rows; params['batch_size'] is "
                f"{batch_size}{' and training needs whole batches' if rows < batch_size else ''}"
                ". To give a data set, return TensorDataset(features, labels) or "
                "torch_tpu_estimator.data.TensorSlices((features, labels))")
        return [source]
    kind = kind_of(source)
    if kind == "map_dataset" and len(source) == 0:
        raise ValueError("input_fn returned an empty Dataset (len 0)")
    return source


def kind_of(source: Any) -> str:
    if isinstance(source, DataLoader):
        return "batches"
    if isinstance(source, IterableDataset):
        return "iterable_dataset"
    if isinstance(source, Dataset):
        if not hasattr(source, "__len__"):
            raise TypeError("input_fn returned a map-style Dataset without __len__")
        return "map_dataset"
    if isinstance(source, (torch.Tensor, Mapping, str, bytes)) or (
        isinstance(source, tuple) and any(isinstance(x, torch.Tensor) for x in source)
    ):
        raise TypeError(
            f"input_fn returned a {type(source).__name__}; return a Dataset (e.g. "
            "TensorDataset(features, labels)), a DataLoader, an iterable of batches, or one "
            "batch as (features, labels) or (features, None)"
        )
    try:
        iterator = iter(source)
    except TypeError:
        raise TypeError(
            f"input_fn must return a Dataset, a DataLoader or an iterable of batches, "
            f"got {type(source).__name__}"
        ) from None
    return "one_shot" if iterator is source else "batches"


def has_distributed_sampler(source: Any) -> bool:
    """Whether a DataLoader shards its data set over several replicas itself."""
    if not isinstance(source, DataLoader):
        return False
    samplers = (source.sampler, getattr(source.batch_sampler, "sampler", None))
    return any(isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1
               for sampler in samplers)
