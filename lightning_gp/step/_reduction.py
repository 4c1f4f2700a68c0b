"""What a scalar loss says of its reduction: the loss of the whole batch against those of its two halves.

A scalar alone cannot reveal whether it is the mean or the sum of the per-sample losses, and a wrong guess
scales every per-sample gradient by B. The check (``docs/design/loss-reduction.md``) runs the step on the two
halves of the batch without grad: L = L₁ + L₂ says "sum", L = (L₁ + L₂)/2 says "mean", anything else (BatchNorm,
dropout, a loss coupling the samples, a step that cannot run on half a batch) says nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gp.step._batch import slice_batch

#: Relative tolerance of the comparison.
RTOL = 1e-4


def observed_reduction(run: Callable[[Any], Tensor], batch: Any, n: int, loss: Tensor) -> tuple[str | None, str]:
    """``("sum" | "mean" | None, detail)``: what ``loss`` (``run(batch)`` of ``n`` samples) behaves like, and the
    three values for a message. ``run`` must be an extra pass on a forked random stream (it puts back whatever the
    step changes, and leaves the run's stream alone: ``StepContext.extra_loss(half, "fork")``)."""
    if n < 2:
        return None, ""
    try:
        with torch.no_grad():
            halves = [run(slice_batch(batch, n, part)) for part in (slice(0, n // 2), slice(n // 2, n))]
    except (RuntimeError, ValueError, IndexError, TypeError):  # a step that cannot run on half a batch
        return None, ""
    if any(h is None for h in halves):  # the step skipped a half
        return None, ""
    full, total = float(loss.detach()), float(halves[0].detach() + halves[1].detach())
    tol = RTOL * max(abs(full), abs(total), 1e-12)
    as_sum, as_mean = abs(full - total) <= tol, abs(full - total / 2) <= tol
    actual = "sum" if as_sum and not as_mean else "mean" if as_mean and not as_sum else None
    detail = (f" (loss of the whole batch of {n}: {full:.6g}; of its two halves: {float(halves[0].detach()):.6g} and "
              f"{float(halves[1].detach()):.6g})")
    return actual, detail


def agreed(actual: str | None, broadcast: Callable[[Tensor], Tensor] | None, device: torch.device) -> str | None:
    """Rank 0's verdict on every rank (``broadcast`` from rank 0, None on one process): ranks see different data,
    and one rank raising while the others enter a collective would hang the job instead of failing it."""
    if broadcast is None:
        return actual
    code = broadcast(torch.tensor([(None, "sum", "mean").index(actual)], device=device))
    return (None, "sum", "mean")[int(code)]


def reduction_error(owner: str, declared: str, actual: str, detail: str, off: str = "check_reduction=False") -> str:
    """The message of a declared reduction the loss contradicts."""
    return (f"{owner}(loss_reduction={declared!r}): `training_step` returned a loss that behaves like a {actual} over "
            f"the batch{detail}. Per-sample gradients would be off by a factor of the batch size. Pass "
            f"`loss_reduction={actual!r}` (or `{off}` if this is intended).")


def check_reduction(owner: str, declared: str, run: Callable[[Any], Tensor | None], batch: Any, n: int, loss: Tensor,
                    broadcast: Callable[[Tensor], Tensor] | None = None) -> None:
    """The one loss-reduction check: raise when ``loss`` (of ``batch``, ``n`` samples) behaves like the other
    reduction than ``declared``, rank 0's verdict on every rank (``run``: :func:`observed_reduction`'s).

    Raises:
        ValueError: :func:`reduction_error`'s message.
    """
    actual, detail = observed_reduction(run, batch, n, loss)
    actual = agreed(actual, broadcast, loss.device)
    if actual is not None and actual != declared:
        raise ValueError(reduction_error(owner, declared, actual, detail))
