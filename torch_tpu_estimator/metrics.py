"""`torch_tpu_estimator.metrics`, the path users import metrics from (api/metrics.py)."""

from .api.metrics import (
    AUC,
    Mean,
    Metric,
    Ratio,
    accuracy,
    auc,
    mean,
    mean_squared_error,
    precision,
    recall,
)

__all__ = ["AUC", "Mean", "Metric", "Ratio", "accuracy", "auc", "mean", "mean_squared_error",
           "precision", "recall"]
