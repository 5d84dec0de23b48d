"""`torch_tpu_estimator.lr_schedules`, the path users import TF's decays from
(api/lr_schedules.py)."""

from .api.lr_schedules import ExponentialDecay, PolynomialDecay

__all__ = ["ExponentialDecay", "PolynomialDecay"]
