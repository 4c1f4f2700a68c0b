"""Argument checks shared by the functional layer.

Every message names the argument, shows the bad value and says how to fix it, so a mistake fails at
the call that made it rather than as a NaN hundreds of steps later.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def check_non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a non-negative number, got {value!r}.")
    return float(value)


def check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"`{name}` must be a positive number, got {value!r}.")
    return float(value)


def check_positive_int(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    return value


def check_choice(value: str, name: str, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")
    return value


def check_penalty_shape(power: float, center: float) -> None:
    """φ(n) = (n − center)^power needs power ≥ 1 (a finite derivative at n = 0) and center ≥ 0."""
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not power >= 1:
        raise ValueError(
            f"`power` must be a number >= 1, got {power!r}. Use power=1 for ε‖∇ₓℓ‖ and power=2 for λ‖∇ₓℓ‖² "
            f"(below 1 the penalty's derivative is infinite at a zero gradient)."
        )
    check_non_negative(center, "center")


def check_clamp(clamp: tuple[float, float] | None) -> tuple[float, float] | None:
    """A valid input range ``(lo, hi)`` with lo < hi, as floats, or None."""
    if clamp is None:
        return None
    try:
        lo, hi = clamp
    except (TypeError, ValueError):
        raise ValueError(f"`clamp` must be a pair (lo, hi) or None, got {clamp!r}.") from None
    if not lo < hi:
        raise ValueError(f"`clamp` must satisfy lo < hi, got {clamp!r}.")
    return float(lo), float(hi)


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
        raise ValueError(f"`{name}` holds no tensors that require grad; nothing to differentiate.")
    for i, p in enumerate(out):
        if not p.requires_grad:
            raise ValueError(f"`{name}[{i}]` (shape {tuple(p.shape)}) does not require grad.")
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
