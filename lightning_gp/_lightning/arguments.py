"""The constructor arguments of the callbacks and monitors, read back and printed (their checks, which name the owner,
the argument and its value, are the functional layer's: :mod:`lightning_gp.functional._checks`)."""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["init_arguments", "init_repr", "with_resolved"]


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


def with_resolved(text: str, method: str, resolved: str | None) -> str:
    """A ``repr`` that shows what ``method="auto"`` chose, once it has: ``Class(..., method='auto' -> 'x')``.

    Example:


        >>> with_resolved("Penalty(weight=0.1)", "auto", "finite_difference")
        "Penalty(weight=0.1, method='auto' -> 'finite_difference')"
    """
    if method != "auto" or resolved is None:
        return text
    return f"{text[:-1]}{', ' if not text.endswith('()') else ''}method='auto' -> {resolved!r})"
