"""Perturb a layer's output and read gradients with respect to it: input-space methods on any layer.

Token models take integer ids, which cannot be perturbed; the recipe of Miyato et al. (2017) and Zhu et
al. (2020) perturbs the output of the embedding layer instead. :func:`perturbed_output` adds a tensor δ to a
module's output (its first output if it returns a tuple) for the duration of a block, through a forward
hook that exists only inside the block. The output keeps its graph, so the layers before it (the embedding
table itself) still train, and with a δ that requires grad, ∇_δ of a loss is its gradient with respect to
the layer's output. A (B, T) ``mask`` of real positions zeroes δ at padded ones: they are never perturbed,
and their gradient w.r.t. δ is 0, so they never count in a per-sample norm.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import check_callable
from lightning_gp.functional.gradients import per_sample_norm


@dataclass
class OutputRecord:
    """What :func:`perturbed_output` saw: the layer's unperturbed output and the δ added to it.

    ``delta`` is the tensor given, or, with ``delta=None``, the zero leaf that requires grad made at the
    first call (``torch.autograd.grad(loss, record.delta)`` is then ∇ of the loss w.r.t. the output).
    """

    output: Tensor | None = None
    delta: Tensor | None = None
    calls: int = 0
    masks: list[Tensor] = field(default_factory=list)
    last_pass: int | None = None  # the `forward_pass` of the latest call


class _PassCount:
    """How many :func:`forward_pass` blocks have begun (a process-wide count: passes never nest)."""

    value = 0


@contextlib.contextmanager
def forward_pass() -> Iterator[None]:
    """Marks one forward pass of a multi-pass block (``perturbed_output(reuse=True)``).

    A target must run once per pass; with the passes marked, a second call inside one pass is refused
    whatever its shape (T5's shared embedding in the encoder and the decoder: a decoder as long as the
    encoder must not take the encoder's δ and mask), while calls in later passes take the same δ.
    """
    _PassCount.value += 1
    yield


def expand_mask(mask: Tensor, like: Tensor, name: str = "mask") -> Tensor:
    """A (B, T) mask of real positions broadcast to an output of shape (B, T, ...), in its dtype.

    Raises:
        ValueError: when ``mask`` is not (B, T) for an output of shape (B, T, ...).
    """
    if mask.ndim != 2 or like.ndim < 2 or tuple(mask.shape) != tuple(like.shape[:2]):
        raise ValueError(
            f"`{name}` must have shape (B, T) = {tuple(like.shape[:2])} for a target output of shape "
            f"{tuple(like.shape)} (1 = real position, 0 = padding); got shape {tuple(mask.shape)}."
        )
    return mask.to(like.dtype).reshape(*mask.shape, *([1] * (like.ndim - 2)))


def first_output(output: Any) -> Tensor:
    """The tensor a target returns, or the first element when it returns a tuple or list."""
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def perturbed_output(
    module: nn.Module, delta: Tensor | Callable[[Tensor], Tensor] | None = None, *, mask: Tensor | None = None,
    owner: str = "perturbed_output", reuse: bool = False, names: list[str] | None = None,
) -> Iterator[OutputRecord]:
    """Add ``delta`` to ``module``'s output while the block runs; yields what the module produced.

    Args:
        module: the layer whose output is perturbed (its first output if it returns a tuple).
        delta: a tensor of the output's shape, a function ``output -> delta`` (called at the layer's
            call, e.g. to start from a random point), or None for a zero leaf that requires grad.
        mask: optional (B, T) mask of real positions for a (B, T, ...) output; δ is 0 where it is 0.
        owner: the name errors start with.
        reuse: the block runs several passes (those of nested callbacks, e.g. a finite difference inside
            adversarial training): the same δ is added at every call, each output shaped like the first;
            ``record`` keeps the first call's output and δ. Each pass must be marked by :func:`forward_pass`;
            unmarked calls count as one pass.
        names: the module's names in the model, for error messages.

    Raises:
        TypeError: when the output is not a floating-point tensor.
        ValueError: when the mask has the wrong shape.
        RuntimeError: when the module runs more than once inside the block (with ``reuse``: when a later
            call's output has another shape than the first's).

    Example:


        >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)
        >>> ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
        >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
        >>> with perturbed_output(emb, mask=mask) as rec:
        ...     loss = head(emb(ids)).sum()
        >>> (g,) = torch.autograd.grad(loss, rec.delta)  # ∇ w.r.t. the embeddings, 0 at the padded position
        >>> g.shape, bool(g[1, 2].eq(0).all()), bool(g[0, 2].ne(0).any())
        (torch.Size([2, 3, 4]), True, True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module (the layer whose output is perturbed), got "
                        f"{type(module).__name__}.")
    record = OutputRecord()

    def hook(mod: nn.Module, args: tuple, output: Any) -> Any:
        record.calls += 1
        this_pass = _PassCount.value
        if record.calls > 1 and (not reuse or this_pass == record.last_pass):
            where = f" (registered as {', '.join(f'`{n}`' for n in names)})" if names else ""
            raise RuntimeError(
                f"{owner}: the target `{type(mod).__name__}`{where} runs more than once in one forward pass, so "
                f"its output cannot take one perturbation per sample (a shared embedding called by an encoder and "
                f"a decoder, a layer applied in a loop). Target a module that runs once per pass: give the call "
                f"you mean a module of its own (the weight can stay shared)."
            )
        record.last_pass = this_pass
        if record.calls > 1:
            out = first_output(output)
            if isinstance(out, Tensor) and out.shape == record.output.shape:
                return _added(output, out, record.delta)
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise RuntimeError(
                f"{owner}: the target `{type(mod).__name__}` ran again inside the perturbed step with an output "
                f"of shape {shape}, not {tuple(record.output.shape)}; its perturbation cannot be applied there."
            )
        out = first_output(output)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            kind = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(
                f"{owner}: the target `{type(mod).__name__}` returns {kind}; its output must be a floating-point "
                f"tensor to be perturbed. Target a layer with floating output (e.g. the embedding layer, not "
                f"the tokenizer or an index lookup)."
            )
        record.output = out
        d = delta(out) if callable(delta) else delta
        if d is None:
            d = torch.zeros_like(out, requires_grad=True)
        record.delta = d
        return _added(output, out, d)

    def _added(output: Any, out: Tensor, d: Tensor) -> Any:
        if mask is not None:
            m = expand_mask(mask, out)
            record.masks.append(m)
            d = d * m
        new = out + d.to(out.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        if isinstance(output, list):
            return [new, *output[1:]]
        return new

    handle = module.register_forward_hook(hook)
    try:
        yield record
    finally:
        handle.remove()


def output_gradient(
    loss_fn: Callable[[], Tensor], module: nn.Module, *, mask: Tensor | None = None, create_graph: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``loss_fn()`` with ∇ of it w.r.t. ``module``'s output; returns ``(loss, gradient, output)``.

    For per-sample gradients, ``loss_fn`` returns the *sum* of per-sample losses. Parameter ``.grad`` is
    never touched; with ``create_graph`` the gradient can itself be differentiated (a gradient penalty).

    Example:


        >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)
        >>> ids = torch.tensor([[1, 2], [3, 4]])
        >>> loss, grad, out = output_gradient(lambda: head(emb(ids)).sum(), emb)
        >>> torch.allclose(grad, head.weight.expand(2, 2, 4))
        True
    """
    check_callable(loss_fn, "loss_fn", "a callable taking no argument and returning the summed loss")
    with torch.enable_grad(), perturbed_output(module, mask=mask, owner="output_gradient") as record:
        loss = loss_fn()
    if record.calls == 0:
        raise RuntimeError(f"output_gradient: the module `{type(module).__name__}` did not run in `loss_fn()`.")
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"`loss_fn()` must return a scalar, got {shape}. Return the *sum* of the per-sample losses "
                         f"(e.g. `F.cross_entropy(logits, y, reduction='sum')`), so that row i of the gradient is ∇ℓᵢ.")
    loss = loss.reshape(())
    (grad,) = autograd_grad(loss, record.delta, create_graph=create_graph, retain_graph=True,
                                  allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(record.delta)
    # A NaN/inf loss shows in the gradient too (ReLU's backward turns NaN into a finite 0): never a finite
    # gradient, and never a finite norm, for a non-finite loss.
    return loss, grad + loss.detach().sum() * 0, record.output


def per_sample_output_gradient_norms(
    loss_fn: Callable[[], Tensor], module: nn.Module, *, mask: Tensor | None = None
) -> Tensor:
    """‖∇ℓᵢ‖ w.r.t. ``module``'s output, per sample, over all non-batch dims (padded positions excluded).

    ``loss_fn`` returns the sum of per-sample losses.

    Example:


        >>> emb, head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1)
        >>> ids = torch.tensor([[1, 2], [3, 4]])
        >>> norms = per_sample_output_gradient_norms(lambda: head(emb(ids)).sum(), emb)
        >>> torch.allclose(norms, head.weight.norm() * torch.full((2,), 2.0).sqrt())
        True
    """
    _, grad, _ = output_gradient(loss_fn, module, mask=mask)
    return per_sample_norm(grad)
