"""The update step's part of a saved checkpoint, read without building an update: its layout
across checkpoint formats, the weights inference uses (the EMA's or the module's), a line for
`inspect`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..state.schema import LEGACY_SHARDED, Checkpoint, Layout
from ..state.storage import marker

DEFAULT_OPTIMIZER = "default"


def current_layout(outline: Any, sharded_keys: Callable[[], list[str]]) -> Any:
    """A checkpoint's update state in this version's layout. 0.1 (format 1) kept one
    "optimizer" and "scheduler"; 0.2 (format 2) had this layout, but a sharded checkpoint's
    EMA was one marker for DCP keys "ema/<name>" and its optimizer slots markers for
    "optimizers/<name>/<index>/<slot>"."""
    if not isinstance(outline, Mapping) or "legacy_format" not in outline:
        return outline
    if outline["legacy_format"] == 1:
        optimizer = outline.get("optimizer")
        return {"optimizers": {DEFAULT_OPTIMIZER: optimizer} if optimizer is not None else {},
                "schedulers": {DEFAULT_OPTIMIZER: outline.get("scheduler")}, "ema": None}
    ema = outline.get("ema")
    if ema == LEGACY_SHARDED:
        ema = {key.removeprefix("ema/"): marker(key) for key in sharded_keys()
               if key.startswith("ema/")}
    optimizers = {name: {**state, "state": {
        index: {slot: marker(f"optimizers/{name}/{index}/{slot}") if value == LEGACY_SHARDED
                else value for slot, value in slots.items()}
        for index, slots in state["state"].items()}}
        for name, state in outline.get("optimizers", {}).items()}
    return {"optimizers": optimizers, "schedulers": outline.get("schedulers", {}), "ema": ema}


def inference_weights(saved: Checkpoint, prefer_ema: bool,
                      layout: Layout | None = None) -> dict[str, torch.Tensor]:
    """The weights evaluate, predict and export use: the EMA's when asked for and kept
    (UpdateConfig(ema_for_inference)), else the module's."""
    outline = current_layout(saved.outline("update"), saved.sharded_keys)
    if prefer_ema and isinstance(outline, Mapping) and outline.get("ema") is not None:
        return saved.resolve(outline["ema"], layout)
    return saved.part("model", layout=layout)


def describe(saved: Checkpoint) -> str:
    """What a checkpoint keeps of the update step, in a line (inspect)."""
    outline = current_layout(saved.outline("update"), saved.sharded_keys) or {}
    optimizers = sorted(outline.get("optimizers", {}))
    schedulers = sorted(name for name, state in outline.get("schedulers", {}).items() if state)
    return (f"optimizers: {', '.join(optimizers) or 'none'}; lr schedulers: "
            f"{', '.join(schedulers) or 'none'}; EMA of the weights: "
            f"{'yes' if outline.get('ema') is not None else 'no'}")
