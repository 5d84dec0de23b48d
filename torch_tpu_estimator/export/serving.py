"""load_exported: serve an export on the XLA device, with no model code.

A call pads its rows up to the smallest exported batch size that holds them (a batch larger than
the largest size is split into chunks of it), runs the program for that size, strips the padding
and returns host tensors. The weights move to the device once, at load. Each program runs as its
XLA HLO module inside torch_xla's lazy graph, so it compiles once per batch size and is cached
(torch_xla 2.9 would compile a StableHLO program again on every run).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch_xla
import torch_xla.core.xla_builder as xb
from torch_xla import stablehlo

from ..runtime import xla_compat
from .bundle import load_bundle
from .signature import (
    STABLEHLO_DIR,
    ExportSignature,
    dtype_name,
    hlo_path,
    named_rows,
    newest_export,
    read_signature,
)


class ExportedModel:
    """An export directory as a callable: features in, predictions out.

    Predictions come in their original form: a dict of tensors, or one tensor when model_fn
    predicted one.

    Args:
        export_dir: one export's local directory (load_exported also takes a URL or an
            export_dir_base).
    """

    def __init__(self, export_dir: str):
        self.export_dir = export_dir
        self.signature: ExportSignature = read_signature(export_dir)
        bundle = load_bundle(os.path.join(export_dir, STABLEHLO_DIR))
        self._device = torch_xla.device()
        self._weights = {name: torch.as_tensor(value).to(self._device)
                         for name, value in bundle.state_dict.items()}
        self._constants = [torch.as_tensor(value).to(self._device)
                           for value in bundle.additional_constants]
        self._functions = {function.meta.name: function for function in bundle.stablehlo_funcs}
        for size in self.signature.batch_sizes:
            if self.signature.function_name(size) not in self._functions or not os.path.isfile(
                    hlo_path(export_dir, size)):
                raise ValueError(f"{export_dir!r} lists batch size {size} in its signature but "
                                 "holds no program for it: the export is incomplete")
        self._computations: dict[int, Any] = {}

    @property
    def global_step(self) -> int:
        """The global step of the checkpoint the export came from."""
        return self.signature.global_step

    def _checked(self, features: Any) -> list[torch.Tensor]:
        """The features as the programs' inputs, in order, after checking names, dtypes, shapes."""
        named, is_dict = named_rows(features, "features")
        expected = {spec.name: spec for spec in self.signature.inputs}
        if is_dict != self.signature.features_is_dict or set(named) != set(expected):
            wanted = (f"a dict with keys {sorted(expected)}" if self.signature.features_is_dict
                      else "one tensor")
            given = f"a dict with keys {sorted(named)}" if is_dict else "one tensor"
            raise ValueError(f"this export takes {wanted} as features, got {given}")
        for name, spec in expected.items():
            value = named[name]
            if value.dtype != spec.torch_dtype or tuple(value.shape[1:]) != spec.shape:
                raise ValueError(
                    f"features {name!r} must be {spec.describe()}, got "
                    f"{dtype_name(value.dtype)}{list(value.shape)}")
        return [named[spec.name] for spec in self.signature.inputs]

    def _batch_size_for(self, rows: int) -> int:
        sizes = sorted(self.signature.batch_sizes)
        return next((size for size in sizes if size >= rows), sizes[-1])

    def _computation(self, size: int) -> Any:
        if size not in self._computations:
            with open(hlo_path(self.export_dir, size), "rb") as handle:
                self._computations[size] = xb.computation_from_module_proto(
                    self._op_name(size), handle.read())
        return self._computations[size]

    def _op_name(self, size: int) -> str:
        return f"xla::torch_tpu_estimator_{self.signature.function_name(size)}"

    def _run(self, inputs: list[torch.Tensor], size: int) -> list[torch.Tensor]:
        """One program run over `inputs` (at most `size` rows), padding stripped, on the host."""
        rows = inputs[0].shape[0]
        padded = [torch.cat([value, value.new_zeros((size - rows, *value.shape[1:]))])
                  .to(self._device) for value in inputs]
        arguments = []
        for location in self._functions[self.signature.function_name(size)].meta.input_locations:
            if location.type_ == stablehlo.VariableType.PARAMETER:
                arguments.append(self._weights[location.name])
            elif location.type_ == stablehlo.VariableType.CONSTANT:
                arguments.append(self._constants[location.position])
            else:
                arguments.append(padded[location.position])
        outputs = xla_compat.run_computation(self._op_name(size), arguments,
                                             self._computation(size))
        return [output[:rows] for output in xla_compat.to_cpu(outputs)]

    def __call__(self, features: Any) -> dict[str, torch.Tensor] | torch.Tensor:
        """Predictions for every row of `features` (a tensor or array, or a dict of them)."""
        inputs = self._checked(features)
        rows, start, pieces = inputs[0].shape[0], 0, []
        while start < rows:
            size = self._batch_size_for(rows - start)
            pieces.append(self._run([value[start:start + size] for value in inputs], size))
            start += size
        outputs = {}
        for index, spec in enumerate(self.signature.outputs):
            parts = [piece[index] for piece in pieces]
            outputs[spec.name] = torch.cat(parts) if parts else torch.empty(
                (0, *spec.shape), dtype=spec.torch_dtype)
        return outputs if self.signature.predictions_is_dict else next(iter(outputs.values()))


def load_exported(path: str) -> ExportedModel:
    """The export at `path`, or the newest export under an `export_dir_base`, as a callable.

    Args:
        path: an export directory or an export_dir_base: a local path or an fsspec URL (a
            bucket's export is served from a local copy).

    Returns:
        The ExportedModel: call it with features to get predictions.
    """
    return ExportedModel(newest_export(os.fspath(path)))
