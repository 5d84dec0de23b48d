"""Warm start: a new run's first weights taken from another run's checkpoint, as TF's
`tf.estimator.WarmStartSettings` does for variables.

It applies only while model_dir has no checkpoint of its own (a resumed run restores its own).
Weights are the module's state_dict entries; a selected weight that the checkpoint lacks, or
holds with another shape (a new classifier head), keeps its freshly built value and is named in
the log.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence

import torch

from .checkpoint import resolve_checkpoint_path
from .run_state import Checkpoint, unwrap

logger = logging.getLogger("torch_tpu_estimator")


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
    """Which weights of a new model come from which checkpoint.

    ckpt_to_initialize_from: a checkpoint file, or a model_dir (its latest checkpoint).
    vars_to_warm_start: the new model's weights to take, by state_dict name: a regular
      expression (a full match; ".*", the default, takes all) or a list of names. None takes
      only those named in var_name_to_prev_var_name.
    var_name_to_prev_var_name: new name -> the name the checkpoint holds it under.
    """

    ckpt_to_initialize_from: str
    vars_to_warm_start: str | Sequence[str] | None = ".*"
    var_name_to_prev_var_name: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ckpt_to_initialize_from, str):
            raise TypeError("WarmStartSettings.ckpt_to_initialize_from must be a checkpoint path "
                            f"or a model_dir, got {type(self.ckpt_to_initialize_from).__name__}")
        selection = self.vars_to_warm_start
        if isinstance(selection, str):
            try:
                re.compile(selection)
            except re.error as error:
                raise ValueError(f"WarmStartSettings.vars_to_warm_start {selection!r} is not a "
                                 f"regular expression: {error}") from None
        elif selection is not None and not (isinstance(selection, Sequence) and all(
                isinstance(name, str) for name in selection)):
            raise TypeError("WarmStartSettings.vars_to_warm_start must be a regular expression, "
                            f"a list of names or None, got {selection!r}")
        renames = self.var_name_to_prev_var_name
        if renames is not None and not (isinstance(renames, Mapping) and all(
                isinstance(key, str) and isinstance(value, str) for key, value in renames.items())):
            raise TypeError("WarmStartSettings.var_name_to_prev_var_name must map str to str, "
                            f"got {renames!r}")

    def selects(self, name: str) -> bool:
        renames = self.var_name_to_prev_var_name or {}
        selection = self.vars_to_warm_start
        if selection is None:
            return name in renames
        if isinstance(selection, str):
            return re.fullmatch(selection, name) is not None
        return name in selection


def warm_start(model: torch.nn.Module, settings: WarmStartSettings) -> None:
    """Copies the selected weights of `settings`' checkpoint into `model`, in place."""
    source = resolve_checkpoint_path(settings.ckpt_to_initialize_from)
    saved = Checkpoint.load(source).model_weights
    renames = settings.var_name_to_prev_var_name or {}
    weights = unwrap(model).state_dict()
    taken, skipped = 0, []
    with torch.no_grad():
        for name, tensor in weights.items():
            if not settings.selects(name):
                continue
            previous = renames.get(name, name)
            if previous not in saved:
                skipped.append(f"{name} (not in the checkpoint)")
            elif saved[previous].shape != tensor.shape:
                skipped.append(f"{name} (shape {list(saved[previous].shape)} in the checkpoint, "
                               f"{list(tensor.shape)} in the model)")
            else:
                tensor.copy_(saved[previous])
                taken += 1
    logger.info("Warm started %d of the model's %d weights from %s", taken, len(weights), source)
    for reason in skipped:
        logger.info("Warm start skipped %s: it keeps the value model_init_fn gave it", reason)
