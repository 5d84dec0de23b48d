"""From input_fn to fixed-shape host batches: batching, sharding over replicas, padding, resume.

input_fn(params) may return
  - a map-style `Dataset` of single examples: batched here, reshuffled every pass in training
    (seeded by RunConfig.seed and the pass number);
  - an `IterableDataset` of single examples: batched here;
  - a `DataLoader` or any re-iterable of batches: used as it is, restarted every pass;
  - a one-shot iterator of batches: read once; in training it ends the run when it runs out.
An example or batch is `(features, labels)` or `features` alone; features is a tensor or a dict.

Two layouts (context.ModeContext.input_shards). Per-host input (eval, predict, and training by
default): each process calls input_fn once, with `params["batch_size"]` the global batch, and
keeps its own rows of every global batch; from a Dataset only those rows are loaded. So one
replica and N replicas see the same examples at the same steps. Per-replica input (training with
`per_host_input_for_training=False`): input_fn is called once per replica with the per-replica
batch and `params["context"]` naming its shard, and its batches are used as they are.

Every batch has the same leading size, so each mode compiles one graph: training keeps whole
batches only, eval and predict pad the last one (repeating its last example) and report how many
of its rows are real.

Random draws made while batches are made (a Dataset's `__getitem__`, an iterable's batches) come
from the host generators seeded by the run seed and the position (host_random.py): each example
of a map-style Dataset by its index and the pass, each batch of an iterable by its place in the
pass. A batch read again after a restart, or read ahead, holds what it held the first time.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    IterableDataset,
    TensorDataset,
    get_worker_info,
)
from torch.utils.data._utils.collate import default_collate

from ..api.config import DatasetConfig
from ..api.data import TensorSlices
from ..api.spec import ModeKeys
from ..common.tree import map_tensors, tensors_of
from ..runtime.base import ReplicaContext
from .seeding import derive_seed, host_generators_kept, seed_host, seeded

logger = logging.getLogger("torch_tpu_estimator")


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


def _has_distributed_sampler(source: Any) -> bool:
    """Whether a DataLoader shards its data set over several replicas itself."""
    if not isinstance(source, DataLoader):
        return False
    samplers = (source.sampler, getattr(source.batch_sampler, "sampler", None))
    return any(isinstance(sampler, DistributedSampler) and sampler.num_replicas > 1
               for sampler in samplers)


def _made_apart(iterable: Iterable[Any], start_seed: int,
                item_seed: Callable[[int], int]) -> Iterator[Any]:
    """Iterates `iterable` with the host generators seeded by `start_seed` while it starts (a
    DataLoader draws its shuffle order then) and by item_seed(position) while each item is
    made (host_random.py); the run's generators are left as they were. iter() is called once:
    an iterator whose __iter__ returns a fresh copy (torch_xla's SampleGenerator) is read once."""
    with seeded(start_seed):
        iterator = iter(iterable)
    for position in itertools.count():
        with seeded(item_seed(position)):
            item = next(iterator, _END)
        if item is _END:
            return
        yield item


_END = object()


class _SeededExamples(Dataset):
    """A map-style Dataset whose examples are each made with the host generators seeded by
    the run seed, the pass and the example's index: a random crop or noise drawn in
    `__getitem__` is the same however the example is batched, read ahead, resumed or shared
    out over replicas. A Dataset with its own batched `__getitems__` is seeded once per call,
    by the pass and the call's indices."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[Any]:
        batched = getattr(self.dataset, "__getitems__", None)
        with host_generators_kept():
            if batched is not None:
                seed_host(derive_seed(self.seed, "examples", self.epoch, *indices))
                return batched(indices)
            items = []
            for index in indices:
                seed_host(derive_seed(self.seed, "example", self.epoch, index))
                items.append(self.dataset[index])
            return items


class _SeededStream(IterableDataset):
    """An IterableDataset whose examples are each made with the host generators seeded by the
    run seed, the pass, the DataLoader worker and the example's position in its stream."""

    def __init__(self, dataset: IterableDataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __iter__(self) -> Iterator[Any]:
        worker = get_worker_info()
        where = (self.seed, "stream", self.epoch, worker.id if worker is not None else -1)
        return _made_apart(self.dataset, derive_seed(*where),
                           lambda position: derive_seed(*where, position))


class InputPipeline:
    """Turns what one input_fn call returned into HostBatches of `shard.rows` rows."""

    def __init__(self, source: Any, mode: str, shard: InputShard, config: DatasetConfig,
                 seed: int, one_pass: bool = False):
        self.source = source
        self.one_pass = one_pass
        self.kind = _kind_of(source)
        self.shard = shard
        self.batch_size = shard.rows
        self.global_batch_size = shard.batch_size
        self.first_row = shard.keep_index * shard.rows
        self.config = config
        self.seed = seed
        self.training = mode == ModeKeys.TRAIN
        if shard.key == "host" and _has_distributed_sampler(source):
            raise ValueError(
                "input_fn returned a DataLoader with a DistributedSampler, but this input is "
                "per-host: the estimator itself gives each replica its rows of every global "
                "batch. Return the Dataset (or a DataLoader without DistributedSampler), or, in "
                "training, set TPUConfig(per_host_input_for_training=False) to shard it yourself"
            )

    def examples(self) -> int | None:
        """How many examples one pass reads, when the source says (a map-style Dataset)."""
        return len(self.source) if self.kind == "map_dataset" else None

    def batches(self, start: InputPosition = InputPosition()) -> Iterator[HostBatch]:
        """Training: pass after pass from `start`, until DatasetConfig.num_epochs passes (counted
        from the first) or, with `one_pass`, to the end of the first pass this call reads from;
        eval and predict: one pass."""
        for epoch in itertools.count(start.epoch):
            if self.training and self.config.num_epochs is not None and \
                    epoch >= self.config.num_epochs:
                return
            skip = start.batch if epoch == start.epoch else 0
            produced = 0
            for features, labels, num_real, consumed in self._one_pass(epoch, skip):
                produced += 1
                position = InputPosition(epoch, consumed)
                yield HostBatch(features, labels, num_real, {self.shard.key: position})
            if not self.training or self.kind == "one_shot" or (self.one_pass and produced):
                return
            if produced == 0 and skip == 0:
                raise ValueError(
                    f"input_fn's data yields no complete training batch of "
                    f"{self.global_batch_size} examples (params['batch_size'])"
                )

    def _one_pass(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any, int, int]]:
        """(features, labels, real rows, source batches of the pass read so far), from the
        `skip`-th source batch of pass `epoch` on."""
        if self.kind == "map_dataset":
            yield from self._map_dataset_pass(epoch, skip)
        elif self.kind == "iterable_dataset":
            loader = self._loader(_SeededStream(self.source, self.seed, epoch), epoch,
                                  batch_size=self.global_batch_size, drop_last=self.training)
            yield from self._slices(itertools.islice(loader, skip, None), skip)
        else:
            batches = _made_apart(self.source, pass_seed(self.seed, epoch),
                                  lambda position: derive_seed(self.seed, "batch", epoch, position))
            yield from self._slices(itertools.islice(batches, skip, None), skip)

    def _loader(self, dataset: Any, epoch: int, **kwargs: Any) -> DataLoader:
        generator = torch.Generator().manual_seed(pass_seed(self.seed, epoch))
        return DataLoader(dataset, num_workers=self.config.num_workers, generator=generator,
                          collate_fn=default_collate, **kwargs)

    def _map_dataset_pass(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any, int, int]]:
        """Batches of a map-style Dataset from its `skip`-th on. The pass's order is one int64
        tensor (no Python list per example: memory stays flat whatever the data set size),
        and a TensorDataset or TensorSlices batch is one index_select per tensor, whose cost
        does not depend on torch's intra-op threads (advanced indexing's did, 30x on a busy
        machine)."""
        size, global_batch = len(self.source), self.global_batch_size
        if self.training and self.config.shuffle:
            generator = torch.Generator().manual_seed(pass_seed(self.seed, epoch))
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size)
        steps = size // global_batch if self.training else math.ceil(size / global_batch)
        batches = (self._rows(order, step) for step in range(skip, steps))
        direct = (type(self.source) is TensorDataset or isinstance(self.source, TensorSlices)) \
            and not self.config.num_workers  # TensorDataset: not its subclasses' __getitem__
        if direct:
            fetch = (lambda rows: self.source.rows(rows)) if isinstance(
                self.source, TensorSlices) else (lambda rows: [
                    torch.index_select(tensor, 0, rows) for tensor in self.source.tensors])
            items = ((fetch(rows), num_real) for rows, num_real in batches)
        else:  # the DataLoader collates, in workers if asked; the real counts travel beside it
            real_counts: list[int] = []

            def index_lists() -> Iterator[list[int]]:
                for rows, num_real in batches:
                    real_counts.append(num_real)
                    yield rows.tolist()

            loader = self._loader(_SeededExamples(self.source, self.seed, epoch), epoch,
                                  batch_sampler=index_lists())
            items = ((item, real_counts.pop(0)) for item in loader)
        for count, (item, num_real) in enumerate(items, start=skip + 1):
            features, labels = split_example(item)
            yield features, labels, num_real, count

    def _rows(self, order: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """This process's row indices of global batch `step`, padded with the pass's last row,
        and how many are real."""
        start = step * self.global_batch_size + self.first_row
        rows = order[start:start + self.batch_size]
        missing = self.batch_size - rows.numel()
        if missing > 0:
            rows = torch.cat([rows, order[-1:].expand(missing)])
        return rows, self.batch_size - max(missing, 0)

    def _slices(self, global_batches: Iterable[Any],
                skip: int) -> Iterator[tuple[Any, Any, int, int]]:
        """This process's rows of every batch, padded to `batch_size` rows; in training a batch
        smaller than params["batch_size"] is skipped (one graph), and a larger one is an error."""
        warned = False
        first, size = self.first_row, self.batch_size
        for consumed, item in enumerate(global_batches, start=skip + 1):
            features, labels = split_example(item)
            rows = batch_size_of(features, labels)
            if rows > self.global_batch_size:
                raise ValueError(
                    f"input_fn produced a batch of {rows} examples but params['batch_size'] is "
                    f"{self.global_batch_size}"
                )
            if rows < self.global_batch_size and self.training:
                if not warned:
                    logger.warning(
                        "skipping a training batch of %d examples (batch_size %d): training "
                        "keeps whole batches only, so that one graph is compiled",
                        rows, self.global_batch_size,
                    )
                    warned = True
                continue
            num_real = max(0, min(size, rows - first))
            if num_real:
                piece = map_tensors(lambda t: t[first:first + size], (features, labels))
            else:  # this process's slice of the last batch is all padding
                piece = map_tensors(lambda t: t[-1:], (features, labels))
            features, labels = pad_rows(piece, size)
            yield features, labels, num_real, consumed


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
