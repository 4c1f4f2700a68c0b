"""The constructor arguments of the callbacks and monitors: checked with errors that name them, and printed."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from lightning_gp.functional._checks import check_bool as functional_check_bool
from lightning_gp.functional._checks import check_choice as functional_check_choice
from lightning_gp.functional._checks import check_number
from lightning_gp.functional._checks import check_positive_int as functional_check_positive_int

__all__ = ["check_bool", "check_choice", "check_number", "check_positive_int", "init_arguments", "init_repr"]


def init_arguments(obj: Any) -> dict[str, Any]:
    """``{argument: value}`` of ``obj``'s constructor, read back from the attributes of the same names.

    Example:


        >>> class Penalty:
        ...     def __init__(self, weight, *, power=2):
        ...         self.weight, self.power = weight, power
        >>> init_arguments(Penalty(0.1))
        {'weight': 0.1, 'power': 2}
    """
    return {name: getattr(obj, name) for name, param in inspect.signature(type(obj).__init__).parameters.items()
            if name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and hasattr(obj, name)}


def init_repr(obj: Any) -> str:
    """``Class(arg=value, ...)`` from the constructor's parameters that differ from their defaults.

    Example:


        >>> class Penalty:
        ...     def __init__(self, weight, *, power=2, center=0.0):
        ...         self.weight, self.power, self.center = weight, power, center
        >>> init_repr(Penalty(0.1, center=1.0))
        'Penalty(weight=0.1, center=1.0)'
    """
    defaults = {name: p.default for name, p in inspect.signature(type(obj).__init__).parameters.items()}
    parts = [f"{name}={value!r}" for name, value in init_arguments(obj).items()
             if defaults[name] is inspect.Parameter.empty or not _same(value, defaults[name])]
    return f"{type(obj).__name__}({', '.join(parts)})"


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        equal = a == b
    except Exception:  # a value without a plain ==
        return False
    return equal if isinstance(equal, bool) else False


def _owned(check: Callable[..., Any], error: type[Exception], value: Any, name: str, owner: str, *args: Any) -> Any:
    """``check(value, name, *args)`` of the functional layer, its ``error`` prefixed with ``owner`` and the argument
    (``SharpnessAwareMinimization(scope='Local'): ...``)."""
    try:
        return check(value, name, *args)
    except error as err:
        raise error(f"{owner}({name}={value!r}): {err}") from None


def check_bool(value: Any, name: str, owner: str) -> bool:
    """``value`` if it is a bool, else the functional layer's TypeError, prefixed with ``owner`` and the argument."""
    return _owned(functional_check_bool, TypeError, value, name, owner)


def check_choice(value: Any, name: str, choices: Any, owner: str) -> str:
    """``value`` if it is one of ``choices``, else the functional layer's ValueError, prefixed with ``owner`` and the
    argument."""
    return _owned(functional_check_choice, ValueError, value, name, owner, choices)


def check_positive_int(value: Any, name: str, owner: str) -> int:
    """``value`` if it is an integer ≥ 1, else the functional layer's ValueError, prefixed with ``owner`` and the
    argument."""
    return _owned(functional_check_positive_int, ValueError, value, name, owner)


def with_resolved(text: str, method: str, resolved: str | None) -> str:
    """A ``repr`` that shows what ``method="auto"`` chose, once it has: ``Class(..., method='auto' -> 'x')``.

    Example:


        >>> with_resolved("Penalty(weight=0.1)", "auto", "finite_difference")
        "Penalty(weight=0.1, method='auto' -> 'finite_difference')"
    """
    if method != "auto" or resolved is None:
        return text
    return f"{text[:-1]}{', ' if not text.endswith('()') else ''}method='auto' -> {resolved!r})"
