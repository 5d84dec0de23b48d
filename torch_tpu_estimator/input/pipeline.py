"""From input_fn to fixed-shape host batches: batching, sharding over replicas, padding, resume.

input_fn(params) may return
  - a map-style `Dataset` of single examples: batched here, reshuffled every pass in training
    (seeded by RunConfig.seed and the pass number);
  - an `IterableDataset` of single examples: batched here;
  - a `DataLoader` or any re-iterable of batches: used as it is, restarted every pass;
  - a one-shot iterator of batches: read once; in training it ends the run when it runs out.
An example or batch is `(features, labels)` or `features` alone; features is a tensor or a dict.

Two layouts (step/context.py picks the shards). Per-host input (eval, predict, and training by
default): each process calls input_fn once, with `params["batch_size"]` the global batch, and
keeps its own rows of every global batch; from a Dataset only those rows are loaded. So one
replica and N replicas see the same examples at the same steps. Per-replica input (training with
`per_host_input_for_training=False`): input_fn is called once per replica with the per-replica
batch and `params["context"]` naming its shard, and its batches are used as they are.

Every batch has the same leading size, so each mode compiles one graph: training keeps whole
batches only, eval and predict pad the last one (repeating its last example) and report how many
of its rows are real.

Random draws made while batches are made (a Dataset's `__getitem__`, an iterable's batches) come
from the host generators seeded by the run seed and the position (seeding.py): each example
of a map-style Dataset by its index and the pass, each batch of an iterable by its place in the
pass. A batch read again after a restart, or read ahead, holds what it held the first time.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    IterableDataset,
    TensorDataset,
    get_worker_info,
)
from torch.utils.data._utils.collate import default_collate

from ..api.config import DatasetConfig
from ..api.data import TensorSlices
from ..api.spec import ModeKeys
from ..common.tree import map_tensors
from .batches import HostBatch, InputPosition, InputShard, batch_size_of, pad_rows, split_example
from .seeding import derive_seed, host_generators_kept, seed_host, seeded
from .sources import has_distributed_sampler, kind_of

logger = logging.getLogger("torch_tpu_estimator")


def pass_seed(seed: int, epoch: int) -> int:
    """The seed of one pass over the data: distinct per pass, the same on every replica."""
    return (seed * 1_000_003 + epoch) % (2**63)


def _made_apart(iterable: Iterable[Any], start_seed: int,
                item_seed: Callable[[int], int]) -> Iterator[Any]:
    """Iterates `iterable` with the host generators seeded by `start_seed` while it starts (a
    DataLoader draws its shuffle order then) and by item_seed(position) while each item is
    made (seeding.py); the run's generators are left as they were. iter() is called once:
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
        self.kind = kind_of(source)
        self.shard = shard
        self.batch_size = shard.rows
        self.call_batch_size = shard.batch_size  # params["batch_size"] of the input_fn call
        self.first_row = shard.keep_index * shard.rows
        self.config = config
        self.seed = seed
        self.training = mode == ModeKeys.TRAIN
        if shard.key == "host" and has_distributed_sampler(source):
            raise ValueError(
                "input_fn returned a DataLoader with a DistributedSampler, but this input is "
                "per-host: the estimator itself gives each replica its rows of every global "
                "batch. Return the Dataset (or a DataLoader without DistributedSampler), or, in "
                "training, set TPUConfig(per_host_input_for_training=False) to shard it yourself"
            )

    def examples(self) -> int | None:
        """How many examples one pass reads, when the source says (a map-style Dataset)."""
        return len(self.source) if self.kind == "map_dataset" else None

    def batches(self, start: InputPosition | None = None) -> Iterator[HostBatch]:
        """Training: pass after pass from `start`, until DatasetConfig.num_epochs passes (counted
        from the first) or, with `one_pass`, to the end of the first pass this call reads from;
        eval and predict: one pass."""
        start = start or InputPosition()
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
                    f"{self.call_batch_size} examples (params['batch_size'])"
                )

    def _one_pass(self, epoch: int, skip: int) -> Iterator[tuple[Any, Any, int, int]]:
        """(features, labels, real rows, source batches of the pass read so far), from the
        `skip`-th source batch of pass `epoch` on."""
        if self.kind == "map_dataset":
            yield from self._map_dataset_pass(epoch, skip)
        elif self.kind == "iterable_dataset":
            loader = self._loader(_SeededStream(self.source, self.seed, epoch), epoch,
                                  batch_size=self.call_batch_size, drop_last=self.training)
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
        size, call_batch = len(self.source), self.call_batch_size
        if self.training and self.config.shuffle:
            generator = torch.Generator().manual_seed(pass_seed(self.seed, epoch))
            order = torch.randperm(size, generator=generator)
        else:
            order = torch.arange(size)
        steps = size // call_batch if self.training else math.ceil(size / call_batch)
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
        start = step * self.call_batch_size + self.first_row
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
            if rows > self.call_batch_size:
                raise ValueError(
                    f"input_fn produced a batch of {rows} examples but params['batch_size'] is "
                    f"{self.call_batch_size}"
                )
            if rows < self.call_batch_size and self.training:
                if not warned:
                    logger.warning(
                        "skipping a training batch of %d examples (batch_size %d): training "
                        "keeps whole batches only, so that one graph is compiled",
                        rows, self.call_batch_size,
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
