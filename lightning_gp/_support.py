"""What every callback and monitor checks in ``setup`` and how it prints itself."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

#: Strategies the package is tested with. Sharded ones (FSDP, DeepSpeed, ModelParallelStrategy) split the
#: parameters across ranks, and the per-sample norms, the parameter penalty's ``functional_call`` and the
#: monitors' gradient norms all read whole parameters.
SUPPORTED = "SingleDeviceStrategy (CPU or one GPU) and DDPStrategy (strategy='ddp', 'ddp_spawn', ...)"


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise a clear error for a strategy the package does not support (sharded ones among them).

    Raises:
        RuntimeError: naming the strategy and what is supported.
    """
    strategy = trainer.strategy
    supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and "DeepSpeed" not in type(strategy).__name__
    if not supported:
        raise RuntimeError(
            f"{owner} does not support `{type(strategy).__name__}`: it needs whole (unsharded) parameters on "
            f"every rank. Supported: {SUPPORTED}. Use one of these, or remove {owner}."
        )


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
