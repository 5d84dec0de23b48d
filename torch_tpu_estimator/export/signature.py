"""An export's signature file: what its programs take and give, and where they came from.

`signature.json` sits at the top of every export directory. It is plain JSON so that a server in
any language can read it: input and output names, dtypes and per-example shapes (the batch axis
is left out), the serving batch sizes with the StableHLO function for each, and the checkpoint
and global step the weights were taken from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import torch

from ..common.paths import is_number_name, is_url, relative_inside
from ..state.stores import store_for

SIGNATURE_NAME = "signature.json"
STABLEHLO_DIR = "stablehlo"
HLO_DIR = "xla_hlo"
TF_SAVED_MODEL_DIR = "tf_saved_model"
ASSETS_EXTRA_DIR = "assets.extra"
FORMAT = "torch_tpu_estimator.export/1"
DEFAULT_SERVING_BATCH_SIZES = (1, 8, 32)
TENSOR_FEATURES = "features"  # the input's name when model_fn takes one tensor, not a dict
TENSOR_PREDICTIONS = "predictions"  # the output's name when model_fn predicts one tensor


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype as signature.json spells it: `float32`, `int64`, `bool`."""
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, dtype (a torch dtype name) and shape of one example."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of_rows(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        """The spec of a batched tensor's rows."""
        return cls(name, dtype_name(tensor.dtype), tuple(tensor.shape[1:]))

    @classmethod
    def from_fields(cls, fields: Any) -> TensorSpec:
        """A spec read from signature.json, each field checked."""
        if not isinstance(fields, dict) or not isinstance(fields.get("name"), str):
            raise ValueError(f"{fields!r} is not a tensor spec with a str name")
        if not isinstance(getattr(torch, str(fields.get("dtype")), None), torch.dtype):
            raise ValueError(f"{fields['name']!r} has dtype {fields.get('dtype')!r}, not a "
                             "torch dtype")
        shape = fields.get("shape")
        if not isinstance(shape, list) or not all(
                isinstance(size, int) and not isinstance(size, bool) and size >= 0
                for size in shape):
            raise ValueError(f"{fields['name']!r} has shape {shape!r}, not a list of sizes")
        return cls(fields["name"], fields["dtype"], tuple(shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def describe(self) -> str:
        return f"{self.name}: {self.dtype}[batch{''.join(f', {size}' for size in self.shape)}]"


@dataclasses.dataclass(frozen=True)
class ExportSignature:
    """Everything a server needs to call an export's programs without the model's code.

    features_is_dict / predictions_is_dict: whether model_fn took a dict of features (else one
      tensor, named `features`) and gave a dict of outputs (else one tensor, named `predictions`).
    functions: batch size -> name of the StableHLO function traced at that batch size.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    features_is_dict: bool
    predictions_is_dict: bool
    batch_sizes: tuple[int, ...]
    checkpoint: str
    global_step: int
    tf_saved_model: bool = False
    assets_extra: tuple[str, ...] = ()

    @staticmethod
    def function_name(batch_size: int) -> str:
        return f"batch_{batch_size}"

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        fields["functions"] = {str(size): self.function_name(size) for size in self.batch_sizes}
        return json.dumps({"format": FORMAT, **fields}, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> ExportSignature:
        """The signature in `text`, every field checked: a crafted file names no path outside
        the export, no dtype that is not a torch dtype, no batch size that is not a positive
        int."""
        try:
            fields: dict[str, Any] = json.loads(text)
            if not isinstance(fields, dict) or fields.pop("format", None) != FORMAT:
                raise ValueError("unknown format")
            fields.pop("functions", None)
            for key in ("inputs", "outputs"):
                fields[key] = tuple(TensorSpec.from_fields(spec) for spec in fields[key])
            fields["batch_sizes"] = tuple(_positive_int(size, "batch size")
                                          for size in fields["batch_sizes"])
            fields["assets_extra"] = tuple(relative_inside(name, f"{source} assets_extra")
                                           for name in fields.get("assets_extra", ()))
            _check_types(fields, {"features_is_dict": bool, "predictions_is_dict": bool,
                                  "checkpoint": str, "global_step": int, "tf_saved_model": bool})
            return cls(**fields)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{source} is not a torch_tpu_estimator export signature "
                             f"({FORMAT}): {error}") from None


def _positive_int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{what} {value!r} is not a positive int")
    return value


def _check_types(fields: dict[str, Any], types: dict[str, type]) -> None:
    for key, kind in types.items():
        if key in fields and (not isinstance(fields[key], kind) or (
                kind is int and isinstance(fields[key], bool))):
            raise ValueError(f"{key} {fields[key]!r} is not a {kind.__name__}")


def named_rows(features: Any, what: str) -> tuple[dict[str, torch.Tensor], bool]:
    """Features (a tensor, an array, or a dict of them) as an ordered name -> tensor dict with
    one row count, and whether they came as a dict."""
    is_dict = isinstance(features, dict)
    named = features if is_dict else {TENSOR_FEATURES: features}
    if not named:
        raise ValueError(f"{what} is an empty dict: give at least one tensor")
    tensors = {}
    for name, value in named.items():
        label = f"{what}[{name!r}]" if is_dict else what
        if not isinstance(name, str):
            raise TypeError(f"{what} must have str keys, got {name!r}")
        if not isinstance(value, (torch.Tensor, np.ndarray)):
            raise TypeError(f"{label} must be a tensor or NumPy array with the batch as its first "
                            f"axis, got {type(value).__name__}")
        tensor = torch.as_tensor(value)
        if tensor.dim() == 0:
            raise ValueError(f"{label} is a scalar: it needs the batch as its first axis")
        tensors[name] = tensor
    rows = {name: tensor.shape[0] for name, tensor in tensors.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{what} have different batch sizes (first axes): {rows}")
    return tensors, is_dict


def hlo_path(export_dir: str, batch_size: int) -> str:
    """The XLA HloModuleProto of the program traced at `batch_size`."""
    return os.path.join(export_dir, HLO_DIR, f"{ExportSignature.function_name(batch_size)}.pb")


def read_signature(export_dir: str) -> ExportSignature:
    """The signature of the export in `export_dir`."""
    path = os.path.join(export_dir, SIGNATURE_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{export_dir!r} is not an export directory: it has no {SIGNATURE_NAME}")
    with open(path) as handle:
        return ExportSignature.from_json(handle.read(), path)


def is_export_dir(path: str) -> bool:
    """Whether `path` is one export (it has a signature file)."""
    return os.path.isfile(os.path.join(path, SIGNATURE_NAME))


def newest_export(path: str) -> str:
    """`path` itself when it is an export, else its newest timestamped export directory; an
    export in a bucket as a local copy of it."""
    if is_url(path):
        return _newest_export_in_store(path)
    if is_export_dir(path):
        return path
    if not os.path.isdir(path):
        raise ValueError(f"no export at {path!r}: not a directory")
    stamps = [name for name in os.listdir(path)
              if is_number_name(name) and is_export_dir(os.path.join(path, name))]
    if not stamps:
        raise ValueError(f"no export at {path!r}: it has no {SIGNATURE_NAME} and no timestamped "
                         "export directory")
    return os.path.join(path, max(stamps, key=int))


def _newest_export_in_store(path: str) -> str:
    """A local copy of the export at `path` in a bucket, or of the newest one under it whose
    upload finished (its signature, uploaded last, is there)."""
    store = store_for(path)
    if not store.exists(store.join(path, SIGNATURE_NAME)):
        stamps = [name for name in store.listdir(path) if is_number_name(name)
                  and store.exists(store.join(store.join(path, name), SIGNATURE_NAME))]
        if not stamps:
            raise ValueError(f"no export at {path!r}: it has no {SIGNATURE_NAME} and no "
                             "timestamped export whose upload finished")
        path = store.join(path, max(stamps, key=int))
    return store.local_copy(path, pinned=True)
