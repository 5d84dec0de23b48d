"""What a checkpoint, a model_dir, an export or an export base holds, as lines of text
(`python -m torch_tpu_estimator inspect PATH`). Nothing is loaded onto a device and nothing is
written; a sharded checkpoint is described from its metadata alone."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable

from ..export.bundle import DATA_DIR, read_array_header, regular_files
from ..export.signature import STABLEHLO_DIR, dtype_name, newest_export, read_signature
from ..state.checkpoint import INDEX_NAME, resolve_checkpoint_path
from ..state.schema import Checkpoint
from ..state.storage import REST_NAME
from ..state.stores import store_for
from ..step.update_state import describe as describe_update


def _variable_lines(variables: Iterable[tuple[str, str, tuple[int, ...]]]) -> list[str]:
    rows = sorted(variables)
    width = max((len(name) for name, _, _ in rows), default=0)
    return [f"  {name:<{width}}  {dtype:<8} {list(shape)}" for name, dtype, shape in rows]


def describe_checkpoint(path: str) -> list[str]:
    """Step, saved state and variables of one checkpoint file."""
    saved = Checkpoint.load(path)
    specs = saved.tensor_specs("model")  # a sharded one's from its metadata: no data read
    variables = [(name, dtype_name(dtype), shape) for name, (dtype, shape) in specs.items()]
    size = sum(math.prod(shape) for _, shape in specs.values())
    lines = [f"checkpoint: {path}" + (" (sharded)" if saved.sharded else ""),
             f"global_step: {saved.global_step}",
             describe_update(saved)]
    for key, position in sorted(saved.input_positions.items()):
        lines.append(f"input position {key!r}: pass {position['epoch']}, batch {position['batch']}")
    lines.append(f"variables ({len(variables)}, {size} values):")
    return lines + _variable_lines(variables)


def describe_export(export_dir: str) -> list[str]:
    """Signature, source checkpoint and variables of one export."""
    signature = read_signature(export_dir)
    lines = [f"export: {export_dir}",
             f"from checkpoint: {signature.checkpoint} (global_step {signature.global_step})",
             f"batch sizes: {list(signature.batch_sizes)}",
             f"TF SavedModel: {'tf_saved_model/' if signature.tf_saved_model else 'no'}",
             "inputs:", *(f"  {spec.describe()}" for spec in signature.inputs),
             "outputs:", *(f"  {spec.describe()}" for spec in signature.outputs)]
    if signature.assets_extra:
        lines += ["assets.extra:", *(f"  {name}" for name in signature.assets_extra)]
    data_dir = os.path.join(export_dir, STABLEHLO_DIR, DATA_DIR)
    variables = [(name, *read_array_header(path)) for name, path in regular_files(data_dir)]
    lines.append(f"variables ({len(variables)}):")
    return lines + _variable_lines(variables)


def describe(path: str) -> list[str]:
    """Lines describing what `path` holds."""
    store = store_for(path)  # a local path or a bucket's URL
    if store.isdir(path) and not store.exists(store.join(path, INDEX_NAME)) and \
            not store.exists(store.join(path, REST_NAME)):
        return describe_export(newest_export(path))
    return describe_checkpoint(resolve_checkpoint_path(path))
