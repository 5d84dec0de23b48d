"""Calling model_fn and input_fn by argument name, as TF's Estimator does.

A TF-style `model_fn(features, labels, mode, config, params)`, a PyTorch-style
`model_fn(model, features, labels, mode, params)` and any other subset or order of the known
names are all called right; an argument whose name is unknown is a ValueError naming it, raised
before any work (never a silent shift of every argument by one).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

MODEL_FN_ARGUMENTS = ("model", "features", "labels", "mode", "params", "config", "update")
INPUT_FN_ARGUMENTS = ("params", "mode", "config", "input_context")


@dataclasses.dataclass(frozen=True)
class Binding:
    """Which of the known values a function takes, by name (or `params` alone, positionally)."""

    fn: Callable[..., Any]
    names: tuple[str, ...]
    positional_params: bool = False

    def __call__(self, **values: Any) -> Any:
        if self.positional_params:
            return self.fn(values["params"])
        return self.fn(**{name: values[name] for name in self.names})


def bind(fn: Callable[..., Any], what: str, known: Sequence[str],
         params_alone: bool = False) -> Binding:
    """The Binding of `fn`'s arguments to `known` names. With `params_alone`, a function of one
    argument under another name receives params (input_fn(p) written as a lambda)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C function: no signature to read
        raise ValueError(f"{what}'s arguments cannot be read (no Python signature): wrap it in a "
                         f"function whose arguments are named from {list(known)}") from None
    named = [parameter for parameter in parameters if parameter.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    if params_alone and len(named) == 1 and named[0].name not in known and \
            named[0].kind != inspect.Parameter.KEYWORD_ONLY:
        return Binding(fn, ("params",), positional_params=True)
    names = []
    for parameter in named:
        if parameter.name in known:
            names.append(parameter.name)
        elif parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"{what} takes an argument {parameter.name!r} that cannot be bound: its "
                f"arguments are passed by name, from {list(known)} (any subset, any order)")
        if parameter.kind == inspect.Parameter.POSITIONAL_ONLY:
            raise ValueError(f"{what}'s argument {parameter.name!r} is positional-only: its "
                             "arguments are passed by name")
    return Binding(fn, tuple(names))
