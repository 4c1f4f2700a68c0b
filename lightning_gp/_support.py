"""What every callback and monitor checks in ``setup`` and how it prints itself."""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lightning_gp.functional._checks import check_bool as functional_check_bool

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


def check_batch_step(pl_module: pl.LightningModule, owner: str) -> None:
    """Refuse ``training_step(self, dataloader_iter)``: the step draws its own batches, so a callback can neither
    see the batch nor run the step on it again.

    Raises:
        RuntimeError: naming the step's signature and the two ways that work.
    """
    if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
        raise RuntimeError(
            f"{owner} needs the batch of each step, but `{type(pl_module).__name__}.training_step(self, "
            f"dataloader_iter)` draws its own batches inside the step, where {owner} can neither see them nor run "
            f"the step again. Take the batch as `training_step(self, batch, batch_idx)`, or, keeping the iterator, "
            f"return `lightning_gp.manual.penalized_loss(self, loss_fn, batch, [...])` on the batch your step draws "
            f"(and remove {owner} from the Trainer)."
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


def vectors_fit(vectors: dict[str, Any], module: Any) -> bool:
    """True when every warm-start vector belongs to a layer of ``module`` with a weight of its length."""
    modules = dict(module.named_modules())
    for name, u in vectors.items():
        weight = getattr(modules.get(name), "weight", None)
        if not hasattr(weight, 'shape') or weight.ndim == 0 or tuple(u.shape) != (weight.shape[0],):
            return False
    return True


def check_forward(module: Any, owner: str, fix: str) -> None:
    """Raise a clear error when ``module`` (that ``owner`` calls) defines no ``forward``.

    torch's own error ("missing the required forward function") would come mid-training and name no fix.
    """
    import torch

    forward = getattr(type(module), "forward", None)
    if forward in (torch.nn.Module.forward, pl.LightningModule.forward):
        raise NotImplementedError(
            f"{owner} calls `{type(module).__name__}(inputs)`, but `{type(module).__name__}` defines no `forward`. "
            f"{fix}"
        )
