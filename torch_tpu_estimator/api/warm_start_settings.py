"""WarmStartSettings: which weights of a new run come from which checkpoint.

As TF's `tf.estimator.WarmStartSettings` says for variables (state/warm_start.py applies them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class WarmStartSettings:
    """Which weights of a new model come from which checkpoint.

    Attributes:
        ckpt_to_initialize_from: a checkpoint file, or a model_dir (its latest checkpoint).
        vars_to_warm_start: the new model's weights to take, by state_dict name: a regular expression
            (a full match; ".*", the default, takes all) or a list of names. None takes only those
            named in var_name_to_prev_var_name.
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

    @classmethod
    def of(cls, warm_start_from: Any) -> WarmStartSettings | None:
        """TPUEstimator's warm_start_from (a path, settings, or None) as settings."""
        if isinstance(warm_start_from, str):
            return cls(warm_start_from)
        if warm_start_from is not None and not isinstance(warm_start_from, cls):
            raise TypeError(
                f"warm_start_from must be a checkpoint path, a model_dir or a WarmStartSettings, "
                f"got {type(warm_start_from).__name__}")
        return warm_start_from

    def selects(self, name: str) -> bool:
        """Whether the new model's weight `name` is warm-started."""
        renames = self.var_name_to_prev_var_name or {}
        selection = self.vars_to_warm_start
        if selection is None:
            return name in renames
        if isinstance(selection, str):
            return re.fullmatch(selection, name) is not None
        return name in selection
