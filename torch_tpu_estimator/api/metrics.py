"""Streaming metrics that metric_fn returns, accumulated exactly across batches and replicas.

metric_fn runs on the host, once per window, on that window's tensors (gathered from every
replica, padding removed). Each function here returns a Metric holding sufficient statistics
(sums and counts), and the estimator merges the Metrics of successive windows, so the final value
equals the metric computed over the whole data set at once, not a mean of per-batch values.

Your own metric: subclass Metric with `merge` (combine two partial states) and `result`.
"""

from __future__ import annotations

import abc
import dataclasses

import torch


class Metric(abc.ABC):
    """A partial metric state that can be merged with another over more examples."""

    @abc.abstractmethod
    def merge(self, other: Metric) -> Metric:
        """The state over both sets of examples."""

    @abc.abstractmethod
    def result(self) -> float:
        """The metric's value."""


def _flat(values: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values).detach().reshape(-1).double()


def _weights(weights: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    if weights is None:
        return torch.ones_like(like)
    weights = _flat(weights)
    if weights.numel() != like.numel():
        weights = torch.broadcast_to(torch.as_tensor(weights), like.shape)
    return weights


@dataclasses.dataclass
class Ratio(Metric):
    """numerator / denominator, both summed over examples (precision, recall, ...)."""

    numerator: float = 0.0
    denominator: float = 0.0

    def merge(self, other: Metric) -> Ratio:
        return type(self)(self.numerator + other.numerator, self.denominator + other.denominator)

    def result(self) -> float:
        return self.numerator / self.denominator if self.denominator else 0.0


class Mean(Ratio):
    """Weighted mean: sum(w * x) / sum(w); NaN over no examples."""

    def result(self) -> float:
        return super().result() if self.denominator else float("nan")


def mean(values: torch.Tensor, weights: torch.Tensor | None = None) -> Mean:
    """The (weighted) mean of every element of `values`."""
    values = _flat(values)
    weights = _weights(weights, values)
    return Mean(float((values * weights).sum()), float(weights.sum()))


def accuracy(labels: torch.Tensor, predictions: torch.Tensor,
             weights: torch.Tensor | None = None) -> Mean:
    """Fraction of predictions equal to labels."""
    return mean(_flat(labels) == _flat(predictions), weights)


def mean_squared_error(labels: torch.Tensor, predictions: torch.Tensor,
                       weights: torch.Tensor | None = None) -> Mean:
    """Mean of (labels - predictions)^2 over every element."""
    return mean((_flat(labels) - _flat(predictions)) ** 2, weights)


def precision(labels: torch.Tensor, predictions: torch.Tensor,
              weights: torch.Tensor | None = None) -> Ratio:
    """true positives / predicted positives, for 0/1 (or boolean) labels and predictions."""
    labels, predictions = _flat(labels) != 0, _flat(predictions) != 0
    weights = _weights(weights, labels.double())
    return Ratio(float((weights * (labels & predictions)).sum()), float((weights * predictions).sum()))


def recall(labels: torch.Tensor, predictions: torch.Tensor,
           weights: torch.Tensor | None = None) -> Ratio:
    """true positives / actual positives, for 0/1 (or boolean) labels and predictions."""
    labels, predictions = _flat(labels) != 0, _flat(predictions) != 0
    weights = _weights(weights, labels.double())
    return Ratio(float((weights * (labels & predictions)).sum()), float((weights * labels).sum()))


@dataclasses.dataclass
class AUC(Metric):
    """Area under the ROC curve from confusion counts at fixed thresholds, as tf.metrics.auc.

    Counts at each threshold add up across batches, so the streamed value is exact for the
    thresholds; their spacing (num_thresholds) bounds the gap to the exact ranking AUC.
    """

    true_positives: torch.Tensor
    false_positives: torch.Tensor
    positives: float
    negatives: float

    def merge(self, other: Metric) -> AUC:
        return AUC(self.true_positives + other.true_positives,
                   self.false_positives + other.false_positives,
                   self.positives + other.positives, self.negatives + other.negatives)

    def result(self) -> float:
        if not self.positives or not self.negatives:
            return float("nan")
        tpr = torch.cat([torch.ones(1, dtype=torch.float64), self.true_positives / self.positives,
                         torch.zeros(1, dtype=torch.float64)])
        fpr = torch.cat([torch.ones(1, dtype=torch.float64), self.false_positives / self.negatives,
                         torch.zeros(1, dtype=torch.float64)])
        return float(torch.trapezoid(tpr.flip(0), fpr.flip(0)))


def auc(labels: torch.Tensor, predictions: torch.Tensor, weights: torch.Tensor | None = None,
        num_thresholds: int = 200) -> AUC:
    """ROC AUC of scores `predictions` in [0, 1] against 0/1 labels."""
    labels, scores = _flat(labels) != 0, _flat(predictions)
    weights = _weights(weights, scores)
    thresholds = torch.linspace(0.0, 1.0, num_thresholds, dtype=torch.float64)[1:-1]
    above = scores[None, :] > thresholds[:, None]
    return AUC(
        true_positives=(above & labels[None, :]).double().mul(weights).sum(1),
        false_positives=(above & ~labels[None, :]).double().mul(weights).sum(1),
        positives=float(weights[labels].sum()),
        negatives=float(weights[~labels].sum()),
    )
