"""The input pipeline below the facade: which rows each process reads, padding, passes, and
that batching a large in-memory data set costs neither memory per example nor depends on
torch's intra-op threads."""

from __future__ import annotations

import statistics
import threading
import time
import tracemalloc

import torch
from torch.utils.data import TensorDataset

from torch_tpu_estimator.config import DatasetConfig
from torch_tpu_estimator.data import TensorSlices
from torch_tpu_estimator.input import InputPipeline, InputPosition, InputShard
from torch_tpu_estimator.runtime.base import ReplicaContext
from torch_tpu_estimator.spec import ModeKeys

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
