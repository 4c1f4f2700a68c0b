"""Argument checks shared by the functional layer.

Every message names the argument, shows the bad value and says how to fix it, so a mistake fails at
the call that made it rather than as a NaN hundreds of steps later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn


def check_tensor(value: object, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}.")
    return value


def check_batched(value: object, name: str) -> Tensor:
    """A tensor whose first dimension is the batch."""
    t = check_tensor(value, name)
    if t.ndim == 0:
        raise ValueError(
            f"`{name}` must have a leading batch dimension, got a 0-d tensor ({t!r}). "
            f"Pass a batch of shape (B, ...); for a single sample use `{name}.unsqueeze(0)`."
        )
    return t


def check_floating_input(value: object, name: str, *, requires_grad: bool) -> Tensor:
    t = check_batched(value, name)
    if not t.is_floating_point():
        raise TypeError(
            f"`{name}` must be floating point to be differentiated, got dtype {t.dtype}. "
            f"Convert it first, e.g. `{name}.float()`; integer inputs (token ids, labels) have no gradient."
        )
    if requires_grad and not t.requires_grad:
        raise ValueError(
            f"`{name}` does not require grad, so no gradient with respect to it exists. "
            f"Call `{name}.requires_grad_()` before the forward pass that produced the output."
        )
    return t


def check_per_sample(output: Tensor, batch_size: int, name: str = "output") -> Tensor:
    """Accept per-sample values of shape (B,) or (B, 1) and return them as (B,)."""
    # Not check_batched: a 0-d output is almost always a loss already reduced over the batch, and the
    # message below (reduce with reduction='none') is the fix, not `unsqueeze(0)`.
    check_tensor(output, name)
    if output.ndim == 2 and output.shape[1] == 1:
        output = output[:, 0]
    if output.ndim != 1 or output.shape[0] != batch_size:
        raise ValueError(
            f"`{name}` must hold one value per sample, shape ({batch_size},) or ({batch_size}, 1), "
            f"got shape {tuple(output.shape)}. Reduce everything but the batch dimension first "
            f"(e.g. `F.cross_entropy(logits, y, reduction='none')`)."
        )
    return output


def check_scalar(value: object, name: str) -> Tensor:
    t = check_tensor(value, name)
    if t.numel() != 1:
        raise ValueError(
            f"`{name}` must be a scalar, got shape {tuple(t.shape)}. "
            f"Reduce it first, e.g. `{name}.mean()`."
        )
    return t.reshape(())


def check_number(value: Any, name: str, owner: str | None = None, *, low: float | None = 0.0, strict: bool = False,
                 high: float | None = None, fix: str = "") -> float:
    """A finite real number in [low, high] (``strict``: low excluded), as a float, or a clear error.

    The one number check of the package: the callbacks pass their class as ``owner`` (the message then starts
    ``Owner(name=value):``), the functional layer passes none.

    Raises:
        TypeError: not a real number (a bool, a string, a tensor...).
        ValueError: NaN, ±Inf or out of range; the message names ``owner``, the argument and the value.
    """
    where = f"{_where(value, name, owner)}`{name}` must be a"
    if isinstance(value, Tensor):
        fix = f"Pass a Python number, e.g. `float({name})`. {fix}".strip()
    tail = f" {fix}" if fix else ""
    kind = ("positive" if strict else "non-negative") if low == 0 else "" if low is None else \
        f"{'>' if strict else '>='} {low:g}"
    kind = f"{kind} number" if low in (0, None) else f"number {kind}"
    if high is not None:
        kind += f" <= {high:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{where} {kind}, got {value!r} (a {type(value).__name__}, not a real number).{tail}")
    number = float(value)
    if not math.isfinite(number):
        why = "NaN is no setting" if math.isnan(number) else "an infinite setting makes the step NaN or meaningless"
        raise ValueError(f"{where} {kind}, got {value!r}; it must be finite ({why}).{tail}")
    if (low is not None and (number <= low if strict else number < low)) or (high is not None and number > high):
        raise ValueError(f"{where} {kind}, got {value!r}.{tail}")
    return number


def check_finite(value: object, name: str, *, minimum: float = 0.0, strict: bool = False, hint: str = "") -> float:
    """:func:`check_number` for the functional layer, whose bad settings are all ValueErrors (documented so)."""
    try:
        return check_number(value, name, low=minimum, strict=strict, fix=hint)
    except TypeError as err:
        raise ValueError(str(err)) from None


def check_non_empty_batch(t: Tensor, name: str, what: str) -> None:
    """Refuse a batch of 0 samples where the result is a mean over samples (``what`` names the function)."""
    if t.shape[0] == 0:
        raise ValueError(
            f"`{name}` is an empty batch (shape {tuple(t.shape)}): {what} is a mean over samples, undefined "
            f"for B = 0. Skip empty batches before calling it (e.g. `if {name}.shape[0] > 0:`, or "
            f"`DataLoader(drop_last=True)`)."
        )


def _where(value: object, name: str, owner: str | None) -> str:
    """The start of a message: ``Owner(name=value): `` for a callback's or monitor's argument, nothing for a
    function's (whose traceback names it)."""
    return f"{owner}({name}={value!r}): " if owner else ""


def check_bool(value: object, name: str, owner: str | None = None) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{_where(value, name, owner)}`{name}` must be True or False, got {type(value).__name__} "
                        f"{value!r}.")
    return value


def check_positive_int(value: int, name: str, owner: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{_where(value, name, owner)}`{name}` must be an integer >= 1, got {value!r}.")
    return value


def check_choice(value: str, name: str, choices: Iterable[str], owner: str | None = None) -> str:
    choices = tuple(choices)
    if value not in choices:
        near = [c for c in choices if isinstance(value, str) and c.lower() == value.strip().lower().replace("-", "_")]
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{_where(value, name, owner)}`{name}` must be one of {list(choices)}, got {value!r}.{hint}")
    return value


def check_callable(value: object, name: str, what: str, owner: str | None = None) -> None:
    """Refuse a ``value`` that cannot be called; ``what`` says what it must be (``a callable mapping ...``)."""
    if not callable(value):
        raise TypeError(f"{owner + ': ' if owner else ''}`{name}` must be {what}, got {type(value).__name__}.")


def check_penalty_shape(power: float, center: float, one_sided: object = False) -> None:
    """φ(n) = (n − center)^power needs a finite power ≥ 1 (a finite derivative at n = 0) and a finite center ≥ 0."""
    check_finite(
        power, "power", minimum=1.0,
        hint="Use power=1 for ε‖∇ₓℓ‖ and power=2 for λ‖∇ₓℓ‖² (below 1 the penalty's derivative is infinite "
        "at a zero gradient; an infinite power has no finite value).",
    )
    check_finite(center, "center", hint="Use center=0 for ‖∇‖ → 0, center=1 for the WGAN-GP target ‖∇‖ = 1.")
    check_bool(one_sided, "one_sided")


def check_clamp(clamp: tuple[float, float] | None) -> tuple[float, float] | None:
    """A valid input range ``(lo, hi)`` with lo < hi, as floats (either may be ±inf), or None."""
    if clamp is None:
        return None
    # a pair of real numbers: not a string such as "01", whose characters float() would read as 0 and 1
    pair = isinstance(clamp, (tuple, list)) and len(clamp) == 2
    if not pair or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in clamp):
        raise ValueError(
            f"`clamp` must be a pair (lo, hi) or None, got {clamp!r}; lo and hi are numbers. Pass e.g. clamp=(0, 1) "
            f"for images."
        )
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:
        raise ValueError(f"`clamp` must satisfy lo < hi, got {clamp!r}. Pass e.g. clamp=(0, 1) for images.")
    return lo, hi


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {tuple(a.shape)} and "
            f"{tuple(b.shape)}. A generator's output must match the real samples' shape."
        )


def as_param_list(params: nn.Module | Iterable[Tensor] | Tensor, name: str = "params") -> list[Tensor]:
    """Parameters that require grad, from a module, a tensor or an iterable of tensors."""
    if isinstance(params, nn.Module):
        out = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, Tensor):
        out = [params]
    else:
        out = list(params)
        for i, p in enumerate(out):
            check_tensor(p, f"{name}[{i}]")
    if not out:
        raise ValueError(
            f"`{name}` holds no tensors that require grad; nothing to differentiate. Pass trainable parameters "
            f"(a module with `requires_grad=True` parameters, or a list of such tensors)."
        )
    seen: dict[int, int] = {}
    for i, p in enumerate(out):
        if not p.requires_grad:
            raise ValueError(
                f"`{name}[{i}]` (shape {tuple(p.shape)}) does not require grad. Call `requires_grad_()` on it "
                f"or leave it out."
            )
        if id(p) in seen:
            raise ValueError(
                f"`{name}[{i}]` (shape {tuple(p.shape)}) is the same tensor as `{name}[{seen[id(p)]}]`; a "
                f"parameter listed twice would count twice in the norm. List each tensor once (e.g. "
                f"`list(dict.fromkeys(params))`, or pass the module)."
            )
        seen[id(p)] = i
    return out


def grads_or_zeros(
    grads: Iterable[Tensor | None], params: list[Tensor], *, what: str, wrt: str
) -> list[Tensor]:
    """Replace unused-parameter ``None`` gradients by zeros; raise if *nothing* was used."""
    grads = list(grads)
    if all(g is None for g in grads):
        raise ValueError(
            f"{what} does not depend on `{wrt}`: its gradient is None for every tensor. "
            f"Check that the tensors passed as `{wrt}` were used to compute it (not a detached copy)."
        )
    return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
