"""From input_fn to fixed-shape host batches: batching, sharding per input pipeline, padding, resume.

input_fn(params) may return
  - a map-style `Dataset` of single examples: batched here, reshuffled every pass in training
    (seeded by RunConfig.seed and the pass number), sharded so that input pipeline r of N takes
    the r-th slice of every global batch;
  - an `IterableDataset` of single examples: batched here into global batches, then sliced;
  - a `DataLoader` or any re-iterable of batches: used as it is, restarted every pass;
  - a one-shot iterator of batches: read once; in training it ends the run when it runs out.
An example or batch is `(features, labels)` or `features` alone; features is a tensor or a dict.

Every batch has the same leading size, so each mode compiles one graph: training keeps whole
batches only, eval and predict pad the last one (repeating its last example) and report how many
of its rows are real.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from .config import InputPipelineConfig
from .runtime.base import ReplicaContext
from .spec import ModeKeys
from .tree import map_tensors, tensors_of

logger = logging.getLogger("torch_tpu_estimator")


@dataclasses.dataclass(frozen=True)
class InputPosition:
    """How far training has read: the pass number and the batches of that pass consumed."""

    epoch: int = 0
    batch: int = 0


@dataclasses.dataclass
class HostBatch:
    """One step's input for one input pipeline, and where the input stands once it is consumed."""

    features: Any
    labels: Any
    num_real: int
    position: InputPosition


def pass_seed(seed: int, epoch: int) -> int:
    """The seed of one pass over the data: distinct per pass, the same on every replica."""
    return (seed * 1_000_003 + epoch) % (2**63)


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


def call_input_fn(input_fn: Callable[[dict], Any], params: Mapping[str, Any]) -> Any:
    """Calls input_fn and checks that what it returned is a kind of input this module reads."""
    source = input_fn(dict(params))
    kind = _kind_of(source)
    if kind == "map_dataset" and len(source) == 0:
        raise ValueError("input_fn returned an empty Dataset (len 0)")
    return source


def _kind_of(source: Any) -> str:
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
            "TensorDataset(features, labels)), a DataLoader, or an iterable of batches"
        )
    try:
        iterator = iter(source)
    except TypeError:
        raise TypeError(
            f"input_fn must return a Dataset, a DataLoader or an iterable of batches, "
            f"got {type(source).__name__}"
        ) from None
    return "one_shot" if iterator is source else "batches"


def _seeded_pass(batches: Iterable[Any], seed: int) -> Iterator[Any]:
    """Iterates a user's iterable with the global torch RNG seeded by `seed` while the pass
    starts (when a DataLoader draws its shuffle order), then restores the RNG as it was: the
    pass order is reproducible on resume and the model's own random draws are left alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        iterator = iter(batches)
        first = next(iterator, _END)
    if first is _END:
        return
    yield first
    yield from iterator


_END = object()


class InputPipeline:
    """Turns input_fn's return value into HostBatches of `batch_size` rows for one pipeline."""

    def __init__(
        self,
        source: Any,
        mode: str,
        batch_size: int,
        context: ReplicaContext,
        config: InputPipelineConfig,
        seed: int,
    ):
        self.source = source
        self.kind = _kind_of(source)
        self.mode = mode
        self.batch_size = batch_size
        self.context = context
        self.config = config
        self.seed = seed
        self.training = mode == ModeKeys.TRAIN

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.context.num_input_pipelines

    def batches(self, start: InputPosition = InputPosition()) -> Iterator[HostBatch]:
        """Training: pass after pass from `start` while passes restart; otherwise one pass."""
        for epoch in itertools.count(start.epoch):
            skip = start.batch if epoch == start.epoch else 0
            produced = 0
            for index, (features, labels, num_real) in enumerate(self._one_pass(epoch, skip)):
                produced += 1
                yield HostBatch(features, labels, num_real, InputPosition(epoch, skip + index + 1))
            if not self.training or self.kind == "one_shot":
                return
            if produced == 0 and skip == 0:
                raise ValueError(
                    f"input_fn's data yields no complete training batch of {self.batch_size} "
                    f"examples per input pipeline (global batch {self.global_batch_size})"
                )

    def _one_pass(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any, int]]:
        if self.kind == "map_dataset":
            yield from self._map_dataset_pass(epoch, skip)
        elif self.kind == "iterable_dataset":
            loader = self._loader(self.source, epoch, batch_size=self.global_batch_size,
                                  drop_last=self.training)
            yield from self._slices(itertools.islice(loader, skip, None))
        else:
            batches = _seeded_pass(self.source, pass_seed(self.seed, epoch))
            yield from self._user_batches(itertools.islice(batches, skip, None))

    def _loader(self, dataset: Any, epoch: int, **kwargs: Any) -> DataLoader:
        generator = torch.Generator().manual_seed(pass_seed(self.seed, epoch))
        return DataLoader(dataset, num_workers=self.config.num_workers, generator=generator,
                          collate_fn=default_collate, **kwargs)

    def _map_dataset_pass(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any, int]]:
        size, global_batch = len(self.source), self.global_batch_size
        if self.training and self.config.shuffle:
            generator = torch.Generator().manual_seed(pass_seed(self.seed, epoch))
            order = torch.randperm(size, generator=generator).tolist()
        else:
            order = list(range(size))
        steps = size // global_batch if self.training else math.ceil(size / global_batch)
        first = self.context.input_pipeline_id * self.batch_size
        index_batches, real_counts = [], []
        for step in range(skip, steps):
            start = step * global_batch + first
            rows = order[start:start + self.batch_size]
            real_counts.append(len(rows))
            rows = rows + [order[-1]] * (self.batch_size - len(rows))
            index_batches.append(rows)
        loader = self._loader(self.source, epoch, batch_sampler=index_batches)
        for item, num_real in zip(loader, real_counts, strict=True):
            features, labels = split_example(item)
            yield features, labels, num_real

    def _slices(self, global_batches: Iterable[Any]) -> Iterator[tuple[Any, Any, int]]:
        first = self.context.input_pipeline_id * self.batch_size
        for item in global_batches:
            features, labels = split_example(item)
            rows = batch_size_of(features, labels)
            num_real = max(0, min(self.batch_size, rows - first))
            if num_real:
                piece = map_tensors(lambda t: t[first:first + self.batch_size], (features, labels))
            else:  # this pipeline's slice of the last global batch is all padding
                piece = map_tensors(lambda t: t[-1:], (features, labels))
            features, labels = pad_rows(piece, self.batch_size)
            yield features, labels, num_real

    def _user_batches(self, batches: Iterable[Any]) -> Iterator[tuple[Any, Any, int]]:
        warned = False
        for item in batches:
            features, labels = split_example(item)
            rows = batch_size_of(features, labels)
            if rows > self.batch_size:
                raise ValueError(
                    f"input_fn produced a batch of {rows} examples but params['batch_size'] is "
                    f"{self.batch_size}"
                )
            if rows < self.batch_size and self.training:
                if not warned:
                    logger.warning(
                        "skipping a training batch of %d examples (batch_size %d): training "
                        "keeps whole batches only, so that one graph is compiled",
                        rows, self.batch_size,
                    )
                    warned = True
                continue
            if rows < self.batch_size:
                features, labels = pad_rows((features, labels), self.batch_size)
            yield features, labels, rows
