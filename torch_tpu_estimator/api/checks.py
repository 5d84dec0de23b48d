"""Checks of the values a user gives, each naming the argument and what was expected, so a
bad value fails where it was given, before any work."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from ..common.paths import checked_url, is_url, local_path, relative_inside

logger = logging.getLogger("torch_tpu_estimator")

RESERVED_PARAMS = ("batch_size", "context", "use_tpu")  # params keys the estimator sets


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def require_positive_int(name: str, value: Any, optional: bool = True) -> None:
    """ValueError naming `name` unless `value` is an int > 0 (bools are not), or None when
    `optional`."""
    if optional and value is None:
        return
    require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{name} must be a positive int{' or None' if optional else ''}, got {value!r}")


def warn_ignored_tf_arguments(owner: str, arguments: dict[str, object]) -> None:
    """Warns once that TF-graph-only arguments a ported script passes have no effect here."""
    given = sorted(name for name, value in arguments.items() if value is not None)
    if given and (owner, tuple(given)) not in _WARNED:
        _WARNED.add((owner, tuple(given)))
        warnings.warn(f"{owner} ignores {', '.join(given)}: they configure TF graphs and sessions, "
                      "which PyTorch/XLA does not have", stacklevel=4)


_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def require_callable(name: str, value: Any, required: bool = True) -> None:
    """TypeError naming `name` unless `value` is callable (or None when not `required`)."""
    if value is None and not required:
        return
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")


def require_positive_int_if_given(name: str, value: Any) -> None:
    """ValueError naming `name` unless `value` is None or an int > 0."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def checked_batch_sizes(batch_sizes: Any) -> tuple[int, ...]:
    """The serving batch sizes, sorted and without repeats."""
    if isinstance(batch_sizes, int) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise TypeError(f"batch_sizes must be a non-empty sequence of ints, got {batch_sizes!r}")
    for size in batch_sizes:
        require_positive_int_if_given("each of batch_sizes", size)
    return tuple(sorted(set(batch_sizes)))


def checked_assets_extra(assets_extra: Mapping[str, str] | None) -> dict[str, str]:
    """assets_extra as {normalized relative destination: existing source file}."""
    if assets_extra is None:
        return {}
    if not isinstance(assets_extra, Mapping):
        raise TypeError("assets_extra must be a dict of destination path -> source file, got "
                        f"{type(assets_extra).__name__}")
    checked = {}
    for destination, source in assets_extra.items():
        normalized = relative_inside(destination, "assets_extra (destination inside "
                                                  "assets.extra/)")
        if normalized in checked:
            raise ValueError(f"assets_extra names {normalized!r} twice")
        if not os.path.isfile(source):
            raise ValueError(f"assets_extra source {source!r} (for {destination!r}) is not a file")
        checked[normalized] = str(source)
    return checked


def require_divisible(name: str, size: int | None, count: int, what: str = "replicas") -> None:
    """ValueError naming `name` when `size` does not divide by `count` of `what`."""
    if size is not None and size % count:
        raise ValueError(f"{name}={size} is not divisible by the number of {what} ({count})")


def require_batch_sizes(sizes: Mapping[str, tuple[int | None, int]], accumulation: int) -> None:
    """Each batch size given ({name: (size, replicas)}) is a positive int its replica count
    divides; the training batch, the replica count times the accumulation steps."""
    for name, (size, replicas) in sizes.items():
        require_positive_int_if_given(name, size)
        require_divisible(name, size, replicas)
        if name == "train_batch_size" and accumulation > 1:
            require_divisible(name, size, replicas * accumulation,
                              "replicas x UpdateConfig.accumulation_steps")


def checked_export_arguments(export_dir_base: Any, as_tf_saved_model: Any, as_text: Any,
                             weights_dtype: Any) -> str:
    """export_saved_model's export_dir_base as a str, once its other arguments are checked."""
    import torch  # here: the configs that use the rest of this module load without torch

    if not isinstance(export_dir_base, (str, os.PathLike)):
        raise TypeError(f"export_dir_base must be a path, got {type(export_dir_base).__name__}")
    export_dir_base = os.fspath(export_dir_base)
    if is_url(export_dir_base):
        export_dir_base = checked_url(export_dir_base, "export_dir_base")
    else:
        export_dir_base = local_path(export_dir_base)
        if os.path.exists(export_dir_base) and not os.path.isdir(export_dir_base):
            raise ValueError(f"export_dir_base {export_dir_base!r} exists and is not a "
                             "directory")
    if not isinstance(as_tf_saved_model, bool) or not isinstance(as_text, bool):
        raise TypeError("as_tf_saved_model and as_text must be bools")
    if weights_dtype is not None and weights_dtype not in (torch.float32, torch.float16,
                                                           torch.float64):
        raise ValueError(f"weights_dtype must be torch.float32, float16 or float64, got "
                         f"{weights_dtype!r} (torch_xla 2.9's exporter stores weights as NumPy "
                         "arrays, which have no bfloat16)")
    return export_dir_base


def resolved_model_dir(model_dir: str | None, config_model_dir: str | None) -> str:
    """The one model_dir of the constructor's and RunConfig's (a new temporary folder, logged,
    when neither gives one, as TF does)."""
    if model_dir and config_model_dir and os.path.abspath(model_dir) != os.path.abspath(config_model_dir):
        raise ValueError(
            f"model_dir={model_dir!r} and config_model_dir={config_model_dir!r} differ; give one"
        )
    resolved = model_dir or config_model_dir
    if resolved is not None and is_url(resolved):  # a bucket: checked, nothing created yet
        return checked_url(resolved, "model_dir")
    if resolved is not None:
        resolved = local_path(resolved)  # file:///x is /x
    if resolved is not None and os.path.islink(resolved) and not os.path.exists(resolved):
        raise ValueError(f"model_dir {resolved!r} is a symbolic link to "
                         f"{os.readlink(resolved)!r}, which does not exist")
    if resolved is None:
        resolved = tempfile.mkdtemp(prefix="torch_tpu_estimator-")
        logger.warning("Using temporary folder as model directory: %s", resolved)
    if os.path.exists(resolved) and not os.path.isdir(resolved):
        raise ValueError(f"model_dir {resolved!r} exists and is not a directory")
    return resolved


def checked_params(params: Any) -> dict:
    """The constructor's params as a dict of its own, holding none of the keys the estimator
    sets."""
    if params is not None and not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    params = dict(params or {})
    for key in RESERVED_PARAMS:
        if key in params:
            raise ValueError(f"params holds the reserved key {key!r}; TPUEstimator sets it. "
                             f"Reserved keys: {RESERVED_PARAMS}")
    return params
