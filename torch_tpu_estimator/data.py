"""`torch_tpu_estimator.data`, the path users import TensorSlices from (api/data.py)."""

from .api.data import TensorSlices

__all__ = ["TensorSlices"]
