"""The input pipeline below the facade: which rows each process reads, padding, passes, and
that batching a large in-memory data set costs neither memory per example nor depends on
torch's intra-op threads."""

from __future__ import annotations

import random
import statistics
import threading
import time
import tracemalloc

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from torch_tpu_estimator.api.config import DatasetConfig
from torch_tpu_estimator.api.spec import ModeKeys
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.input.batches import InputPosition, InputShard
from torch_tpu_estimator.input.pipeline import InputPipeline
from torch_tpu_estimator.runtime.base import ReplicaContext

CONTEXT = ReplicaContext(0, 2, 0, 1, device="cpu")


def _pipeline(source, mode=ModeKeys.EVAL, batch_size=4, keep_index=0, keep_count=1,
              **config) -> InputPipeline:
    shard = InputShard("host", CONTEXT, batch_size, keep_index, keep_count)
    return InputPipeline(source, mode, shard, DatasetConfig(**config), seed=0)


def test_each_process_reads_its_rows_and_the_last_batch_is_padded_with_the_last_example():
    data = TensorDataset(torch.arange(10))
    second = _pipeline(data, keep_index=1, keep_count=2)  # rows 2-3 of every batch of 4
    batches = [(batch.features.tolist(), batch.num_real) for batch in second.batches()]
    assert batches == [([2, 3], 2), ([6, 7], 2), ([9, 9], 0)]  # 8, 9: the first process's
    first = _pipeline(data, keep_index=0, keep_count=2)
    assert [batch.features.tolist() for batch in first.batches()][-1] == [8, 9]


def test_dict_features_of_tensor_slices_batch_like_from_tensor_slices():
    data = TensorSlices(({"x": torch.arange(6), "y": torch.arange(6) * 10}, torch.arange(6) % 2))
    batches = list(_pipeline(data).batches())
    assert [batch.features["y"].tolist() for batch in batches] == [[0, 10, 20, 30],
                                                                  [40, 50, 50, 50]]
    assert batches[1].labels.tolist() == [0, 1, 1, 1] and batches[1].num_real == 2


def test_training_passes_one_pass_and_num_epochs():
    data = TensorDataset(torch.arange(10))  # 2 whole batches of 4 a pass
    def steps(pipeline, start=None):
        start = start or InputPosition()
        return [(batch.positions["host"].epoch, batch.positions["host"].batch)
                for batch, _ in zip(pipeline.batches(start), range(20), strict=False)]
    assert len(steps(_pipeline(data, ModeKeys.TRAIN))) == 20  # repeats until the step limit
    one_pass = _pipeline(data, ModeKeys.TRAIN)
    one_pass.one_pass = True
    assert steps(one_pass) == [(0, 1), (0, 2)]
    assert steps(one_pass, InputPosition(0, 1)) == [(0, 2)]  # finishes the pass it is in
    assert steps(one_pass, InputPosition(0, 2)) == [(1, 1), (1, 2)]  # at its end: the next
    assert steps(_pipeline(data, ModeKeys.TRAIN, num_epochs=2), InputPosition(1, 1)) == [(1, 2)]


def test_a_pass_over_a_million_examples_allocates_no_python_object_per_example():
    data = TensorDataset(torch.zeros(1_000_000, 1))
    pipeline = _pipeline(data, ModeKeys.TRAIN, batch_size=1000)
    tracemalloc.start()
    for batch, _ in zip(pipeline.batches(), range(1000), strict=False):
        del batch
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2_000_000  # a Python list of the pass's order alone would take ~36 MB


def _median_fetch_us(threads: int) -> float:
    """Batches of a TensorDataset fetched in a thread, as the device loader does, while the
    main thread computes, as the traced step does."""
    torch.set_num_threads(threads)
    pipeline = _pipeline(TensorDataset(torch.randn(50_000, 256)), ModeKeys.TRAIN, batch_size=128)
    busy, times = True, []

    def compute():
        matrix = torch.randn(256, 256)
        while busy:
            matrix @ matrix

    worker = threading.Thread(target=compute)
    worker.start()
    batches = pipeline.batches()
    for _ in range(200):
        started = time.perf_counter()
        next(batches)
        times.append(time.perf_counter() - started)
    busy = False
    worker.join()
    return statistics.median(times) * 1e6


def test_fetching_batches_does_not_depend_on_intra_op_threads():
    threads = torch.get_num_threads()
    try:
        one, several = _median_fetch_us(1), _median_fetch_us(max(2, threads))
    finally:
        torch.set_num_threads(threads)
    assert several < 2 * one + 50, (one, several)


# --- every kind of input, each example once per pass ----------------------------------------

class Examples(torch.utils.data.Dataset):
    """A map-style Dataset of its own (not a TensorDataset): batched through a DataLoader."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return torch.tensor(index), torch.tensor(index % 2)


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, count: int):
        self.count = count

    def __iter__(self):
        return ((torch.tensor(index), torch.tensor(index % 2)) for index in range(self.count))


class FreshCopies:
    """torch_xla's SampleGenerator: __iter__ returns a new object that is an iterator itself
    and whose own __iter__ returns yet another fresh copy."""

    def __init__(self, batches: list, start: int = 0):
        self.batches, self.next_index = batches, start

    def __iter__(self):
        return FreshCopies(self.batches)

    def __next__(self):
        if self.next_index == len(self.batches):
            raise StopIteration
        self.next_index += 1
        return self.batches[self.next_index - 1]


def _batches_of(count: int, size: int) -> list:
    ids = torch.arange(count)
    return [(ids[start:start + size], ids[start:start + size] % 2)
            for start in range(0, count, size)]


KINDS = {
    "tensor_dataset": lambda count: TensorDataset(torch.arange(count), torch.arange(count) % 2),
    "dataset": Examples,
    "iterable_dataset": Stream,
    "data_loader": lambda count: torch.utils.data.DataLoader(Examples(count), batch_size=4),
    "list_of_batches": lambda count: _batches_of(count, 4),
    "fresh_copies": lambda count: FreshCopies(_batches_of(count, 4)),
    "one_shot": lambda count: iter(_batches_of(count, 4)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_of_input_gives_each_example_once_per_pass(kind):
    """Evaluate's pass over 10 examples (the last batch padded) and a training pass over 12,
    for every kind of input the README lists."""
    evaluated = list(_pipeline(KINDS[kind](10)).batches())
    real = [row for batch in evaluated for row in batch.features[:batch.num_real].tolist()]
    assert real == list(range(10))
    training = _pipeline(KINDS[kind](12), ModeKeys.TRAIN)  # map-style kinds are shuffled
    training.one_pass = True
    assert sorted(row for batch in training.batches() for row in batch.features.tolist()) == \
        list(range(12))


# --- random draws in the input: a function of the run seed and the position ------------------

class Noisy(torch.utils.data.Dataset):
    """Each read draws from torch's, Python's and NumPy's generators."""

    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        return torch.tensor([index + torch.rand(()).item(), random.random(),
                             float(np.random.rand())])


class NoisyStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return (torch.tensor([index, torch.rand(()).item(), random.random()])
                for index in range(24))


def _noisy_batches():
    """A re-iterable of batches that draws each batch when it is read."""
    class Batches:
        def __iter__(self):
            return (torch.randn(4, 2) + index for index in range(6))
    return Batches()


def _host_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()


def _read(pipeline: InputPipeline, start: InputPosition, count: int) -> list[torch.Tensor]:
    return [batch.features for batch, _ in zip(pipeline.batches(start), range(count),
                                               strict=False)]


@pytest.mark.parametrize("source", [Noisy, NoisyStream, _noisy_batches],
                         ids=["dataset", "iterable_dataset", "batches"])
def test_random_draws_in_the_input_depend_on_the_position_not_on_the_run_s_state(source):
    """Batches read from the middle of a pass, after other draws, equal those read through
    from its start; the run's own generators are left as they were."""
    per_pass = 6  # batches of 4
    whole = _read(_pipeline(source(), ModeKeys.TRAIN), InputPosition(), 2 * per_pass)
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    before = _host_states()
    resumed = _read(_pipeline(source(), ModeKeys.TRAIN), InputPosition(1, 2), 3)
    assert _host_states()[0].equal(before[0]) and _host_states()[1:] == before[1:]
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole[per_pass + 2:per_pass + 5],
                                                 strict=True))
    assert not torch.equal(whole[0], whole[per_pass])  # another pass draws anew


def test_each_example_draws_the_same_whatever_process_reads_it():
    """Two processes, each reading half of every global batch, get the rows one process
    reads, random draws included (each example seeded by its index)."""
    one = torch.cat(_read(_pipeline(Noisy(), ModeKeys.TRAIN, batch_size=8), InputPosition(), 3))
    halves = [_read(_pipeline(Noisy(), ModeKeys.TRAIN, batch_size=8, keep_index=index,
                              keep_count=2), InputPosition(), 3) for index in range(2)]
    two = torch.cat([torch.cat(pair) for pair in zip(*halves, strict=True)])
    assert torch.equal(one, two)
