"""Warm start: a new run's first weights taken from another run's checkpoint, as TF's
`tf.estimator.WarmStartSettings` does for variables.

It applies only while model_dir has no checkpoint of its own (a resumed run restores its own).
Weights are the module's state_dict entries; a selected weight that the checkpoint lacks, or
holds with another shape (a new classifier head), keeps its freshly built value and is named in
the log.
"""

from __future__ import annotations

import logging

import torch

from ..api.warm_start_settings import WarmStartSettings
from .checkpoint import resolve_checkpoint_path
from .run_state import unwrap
from .schema import Checkpoint

logger = logging.getLogger("torch_tpu_estimator")


def warm_start(model: torch.nn.Module, settings: WarmStartSettings) -> None:
    """Copies the selected weights of `settings`' checkpoint into `model`, in place."""
    source = resolve_checkpoint_path(settings.ckpt_to_initialize_from)
    saved = Checkpoint.load(source).part("model")
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
