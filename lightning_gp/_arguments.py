"""The constructor arguments of the callbacks and monitors: checked with errors that name them, and printed."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

from lightning_gp.functional._checks import check_bool as functional_check_bool


def init_repr(obj: Any) -> str:
    """``Class(arg=value, ...)`` from the constructor's parameters that differ from their defaults.

    Example::

        >>> class Penalty:
        ...     def __init__(self, weight, *, power=2, center=0.0):
        ...         self.weight, self.power, self.center = weight, power, center
        >>> init_repr(Penalty(0.1, center=1.0))
        'Penalty(weight=0.1, center=1.0)'
    """
    parts = []
    for name, param in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or not hasattr(obj, name):
            continue
        value = getattr(obj, name)
        if param.default is param.empty or not _same(value, param.default):
            parts.append(f"{name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        equal = a == b
    except Exception:  # a value without a plain ==
        return False
    return equal if isinstance(equal, bool) else False


def check_bool(value: Any, name: str, owner: str) -> bool:
    """``value`` if it is a bool, else the functional layer's TypeError, prefixed with ``owner`` and the argument."""
    try:
        return functional_check_bool(value, name)
    except TypeError as err:
        raise TypeError(f"{owner}({name}={value!r}): {err}") from None


def check_number(value: Any, name: str, owner: str, *, low: float | None = 0.0, strict: bool = False,
                 high: float | None = None, fix: str = "") -> float:
    """A finite real number in [low, high] (``strict``: low excluded), as a float, or a clear error.

    Raises:
        TypeError: not a real number (a bool, a string, a tensor...).
        ValueError: NaN, ±Inf or out of range; the message names ``owner``, the argument and the value.
    """
    where = f"{owner}({name}={value!r}): `{name}` must be a"
    tail = f" {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} real number, got {type(value).__name__}.{tail}")
    number = float(value)
    kind = ("positive" if strict else "non-negative") if low == 0 else "" if low is None else \
        f"{'>' if strict else '>='} {low:g}"
    kind = f"{kind} number" if low in (0, None) else f"number {kind}"
    if high is not None:
        kind += f" <= {high:g}"
    if not math.isfinite(number):
        why = "NaN is no setting" if math.isnan(number) else "an infinite setting makes the step NaN or meaningless"
        raise ValueError(f"{where} finite {kind}, got {value!r} ({why}).{tail}")
    if (low is not None and (number <= low if strict else number < low)) or (high is not None and number > high):
        raise ValueError(f"{where} {kind}, got {value!r}.{tail}")
    return number
