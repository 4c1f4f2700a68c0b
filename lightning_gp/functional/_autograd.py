"""Autograd building blocks of the finite-difference penalties: the linear surrogate and the quotient.

Both let a gradient that was computed by hand enter an *ordinary* backward pass (so DDP's hooks reduce
it like any other gradient) instead of being written into ``.grad``:

- :func:`linearised` is a tensor with a loss's value whose gradient w.r.t. each leaf is a given, detached
  gradient (Σ⟨v, g_v⟩ plus a constant), without a second backward through the loss's graph;
- :func:`finite_difference_term` is the difference quotient (value 0) whose gradient is
  scale·(∇perturbed − ∇base)/h.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor


def autograd_leaves(t: Tensor) -> list[Tensor]:
    """Every tensor a backward from ``t`` deposits a gradient into (its graph's ``AccumulateGrad`` nodes)."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    leaves, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


class Linearised(torch.autograd.Function):
    """The loss's value, with gradient ``g_v`` w.r.t. each leaf v: Σ⟨v, g_v⟩ plus a constant, without its cost.

    Written as a Function rather than ``Σ (v * g).sum()``: no elementwise product in the forward, and the
    backward hands each leaf ``g_v · upstream`` (one scalar multiply, as a hand-written ``g0 + w·g1``), in g's
    own precision whatever autocast is active.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: tuple[Tensor, ...], *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        return (None, None, *(g * upstream.to(g.dtype) for g in grads))


def linearised(loss: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """A tensor with ``loss``'s value whose gradient w.r.t. each leaf v of ``pairs`` (v, g) is g (detached).

    Its backward reaches the leaves directly, not through the loss's graph.
    """
    if not pairs:
        return loss.detach()
    leaves = tuple(v for v, _ in pairs)
    return Linearised.apply(loss.detach(), tuple(g.detach() for _, g in pairs), *leaves)


def finite_difference_term(perturbed: Tensor, base: Tensor, *, step: float, scale: float = 1.0) -> Tensor:
    """The difference quotient as a term of value 0 whose gradient is ``scale · (∇perturbed − ∇base) / step``.

    ``perturbed`` is the loss at the displaced point (x + h·d or θ + h·g), ``base`` the loss at the point
    itself, usually :func:`linearised` (its gradient without a second pass through its graph). Adding the
    term to an objective adds ≈ ∇ of the penalty to the objective's gradient and leaves its value alone.

    Example::

        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> term = finite_difference_term((w + 1e-3).square().sum(), w.square().sum(), step=1e-3)
        >>> (grad,) = torch.autograd.grad(term, w)  # (∇‖w + h‖² − ∇‖w‖²) / h = 2
        >>> float(term.detach()), torch.allclose(grad, torch.full((2,), 2.0), rtol=1e-3)
        (0.0, True)
    """
    diff = (perturbed - base) * (scale / step)
    return diff - diff.detach()


#: What torch says when a graph has no double backward (torch.compile's aot_autograd, fused kernels).
_NO_DOUBLE_BACKWARD = ("double backward", "donated buffer")


def no_double_backward_error(err: RuntimeError) -> RuntimeError | None:
    """A clear error for torch's "no double backward" (torch.compile's aot_autograd, fused kernels), or None."""
    if not any(s in str(err) for s in _NO_DOUBLE_BACKWARD):
        return None
    return RuntimeError(
        "This penalty differentiates a gradient (a double backward), which this model does not support: "
        "torch.compile'd modules and fused attention kernels have none. Use method='finite_difference', "
        f"which needs two ordinary passes instead. (torch: {str(err).splitlines()[0]})"
    )


@contextlib.contextmanager
def explained_double_backward() -> Iterator[None]:
    """Re-raise torch's "no double backward" errors of the block as :func:`no_double_backward_error`."""
    try:
        yield
    except RuntimeError as err:
        clear = no_double_backward_error(err)
        if clear is None:
            raise
        raise clear from err


def grad(outputs: Any, inputs: Any, *, create_graph: bool = False, retain_graph: bool | None = None,
         allow_unused: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``; where a double backward (``create_graph``) is not supported, a clear error.

    Raises:
        RuntimeError: naming ``method="finite_difference"`` when the model has no double backward (a
            ``torch.compile``d module, a fused attention kernel), with torch's own message appended.
    """
    with explained_double_backward() if create_graph else contextlib.nullcontext():
        return torch.autograd.grad(outputs, inputs, create_graph=create_graph, retain_graph=retain_graph,
                                   allow_unused=allow_unused)
