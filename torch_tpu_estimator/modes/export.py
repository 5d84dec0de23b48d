"""Export as a replica worker, like the other modes: the module built in PREDICT mode at the
largest serving batch, its inference weights restored (the EMA's when configured), cast for
serving, then traced, lowered and published (export/saved_model.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from ..api.job import Job
from ..api.spec import ModeKeys
from ..export.saved_model import export_model, serving_weights
from ..runtime.base import Replica
from ..state.schema import Checkpoint
from ..step.building import build_run_state
from ..step.context import ModeContext
from ..step.update_state import inference_weights


@dataclasses.dataclass(frozen=True)
class ExportRequest:
    """One export_saved_model call, its arguments checked (estimator.py)."""

    inputs: dict[str, torch.Tensor]  # example features by name (signature.named_rows)
    features_is_dict: bool
    batch_sizes: tuple[int, ...]
    export_dir_base: str
    checkpoint_path: str
    assets_extra: Mapping[str, str]
    as_tf_saved_model: bool
    weights_dtype: torch.dtype | None


def export_replica(job: Job, replica: Replica, request: ExportRequest) -> str:
    """Exports the request's checkpoint from `replica` (the CPU); returns the new directory."""
    ctx = ModeContext(job, replica, ModeKeys.PREDICT)
    state = build_run_state(ctx, batch_size=request.batch_sizes[-1])
    saved = Checkpoint.load(request.checkpoint_path)
    state.load_weights(inference_weights(saved, job.config.update_config.ema_for_inference),
                       saved)
    return export_model(ctx, serving_weights(state.model.eval(), request.weights_dtype),
                        request.inputs, request.features_is_dict, request.batch_sizes,
                        request.export_dir_base, request.checkpoint_path, saved.global_step,
                        request.assets_extra, request.as_tf_saved_model)
