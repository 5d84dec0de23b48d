"""Streaming metrics: merged over batches they equal the metric over the whole set (sklearn)."""

from __future__ import annotations

import functools

import pytest
import torch
from sklearn.metrics import accuracy_score, mean_squared_error, precision_score, recall_score, roc_auc_score

from torch_tpu_estimator import metrics


def streamed(metric, labels, predictions, chunk=7):
    parts = [metric(labels[i:i + chunk], predictions[i:i + chunk]) for i in range(0, len(labels), chunk)]
    return functools.reduce(lambda total, part: total.merge(part), parts).result()


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (101,), generator=generator)
    scores = (labels * 0.3 + torch.rand(101, generator=generator) * 0.7).clamp(0, 1)
    return labels, scores


def test_classification_metrics_stream_exactly(data):
    labels, scores = data
    predicted = (scores > 0.5).long()
    assert streamed(metrics.accuracy, labels, predicted) == pytest.approx(accuracy_score(labels, predicted))
    assert streamed(metrics.precision, labels, predicted) == pytest.approx(precision_score(labels, predicted))
    assert streamed(metrics.recall, labels, predicted) == pytest.approx(recall_score(labels, predicted))
    assert streamed(metrics.mean_squared_error, labels.float(), scores) == pytest.approx(
        mean_squared_error(labels.float(), scores))


def test_auc_streams_and_approaches_the_exact_ranking_auc(data):
    labels, scores = data
    exact = roc_auc_score(labels, scores)
    fine = functools.partial(metrics.auc, num_thresholds=2000)
    assert streamed(fine, labels, scores) == pytest.approx(fine(labels, scores).result(), abs=1e-12)
    assert streamed(fine, labels, scores) == pytest.approx(exact, abs=2e-3)


def test_weighted_mean_and_a_custom_metric():
    assert metrics.mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])).result() == pytest.approx(1.5)

    class Maximum(metrics.Metric):
        def __init__(self, value):
            self.value = value

        def merge(self, other):
            return Maximum(max(self.value, other.value))

        def result(self):
            return self.value

    assert Maximum(2.0).merge(Maximum(5.0)).merge(Maximum(1.0)).result() == 5.0
