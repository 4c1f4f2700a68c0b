"""Per-sample input gradients and norms: the building blocks of every penalty."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import check_batched, check_floating_input, check_tensor


def input_gradient(output: Tensor, inputs: Tensor, *, create_graph: bool = False) -> Tensor:
    """Gradient of ``output.sum()`` with respect to ``inputs``.

    Summing (not averaging) makes the result *per sample* when ``output`` holds one value per sample
    and samples do not interact: row ``i`` is ∇ₓ outputᵢ, whatever the batch size. It is autograd's gradient
    as is: ReLU's backward gives a NaN input a finite 0 gradient, so check ``output`` for NaN (the penalties do).

    Args:
        output: any tensor computed from ``inputs`` (typically per-sample losses or critic scores).
        inputs: floating-point tensor with ``requires_grad=True`` and a leading batch dimension.
        create_graph: keep the graph of the gradient so it can itself be differentiated (double backprop).

    Example:


        >>> x = torch.randn(4, 3, requires_grad=True)
        >>> g = input_gradient((x**2).sum(dim=1), x)
        >>> torch.allclose(g, 2 * x)
        True
    """
    check_tensor(output, "output")
    check_floating_input(inputs, "inputs", requires_grad=True)
    if not output.requires_grad:
        raise ValueError(
            "`output` does not depend on `inputs` (it has no autograd graph). Compute it from `inputs` "
            "after `inputs.requires_grad_()`, and not under `torch.no_grad()`."
        )
    (grad,) = autograd_grad(output.sum(), inputs, create_graph=create_graph, allow_unused=True)
    if grad is None:
        raise ValueError(
            "`output` does not depend on `inputs`: autograd found no path between them. Make sure the "
            "model is applied to this very tensor, not to a copy or a detached view."
        )
    return grad


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for the half types (their squares overflow at |t| > 256 in float16), else ``dtype`` itself."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def upcast(value: object) -> object:
    """A half-precision tensor in :func:`accumulation_dtype` (float32); anything else as it is."""
    if isinstance(value, Tensor) and value.dtype != accumulation_dtype(value.dtype):
        return value.to(accumulation_dtype(value.dtype))
    return value


def squared_norms(t: Tensor) -> Tensor:
    """Σ of squares over every non-batch dimension, shape (B,), in float32 for half inputs (no overflow).

    Reduces over the non-batch dimensions in place (no reshape): an empty batch gives an empty result, and a
    channels_last or strided tensor is not copied.
    """
    check_batched(t, "t")
    if not t.is_floating_point():
        raise TypeError(
            f"`t` must be floating point, got dtype {t.dtype}. Convert it first, e.g. `t.float()` (an integer "
            f"result would truncate the norm; complex tensors: take `torch.view_as_real(t)`)."
        )
    acc = accumulation_dtype(t.dtype)
    if t.ndim == 1:  # one number per sample (sum over dim=() would reduce over everything)
        return t.to(acc).square()
    return t.to(acc).square().sum(dim=tuple(range(1, t.ndim)))


def per_sample_squared_norm(t: Tensor) -> Tensor:
    """Σ of squares over every non-batch dimension, shape (B,), in ``t``'s dtype. Smooth everywhere.

    Half inputs are accumulated in float32, so only a result that itself exceeds the dtype's range is inf.
    An empty batch gives an empty result.

    Example:


        >>> per_sample_squared_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([25.,  0.])
    """
    return squared_norms(t).to(t.dtype)


def safe_sqrt(s: Tensor) -> Tensor:
    """√s with gradient 0 (not ∞, not NaN) at s = 0, also under double backprop; NaN stays NaN, inf stays inf.

    The double ``where`` keeps the unused branch finite: ``sqrt`` is never evaluated at 0, so no
    ``inf · 0`` reaches the backward pass. Only an exact 0 takes the zero branch: a NaN (a NaN input,
    weight or loss upstream) goes through ``sqrt`` and stays visible in the value, not only in its gradient.
    """
    zero = s == 0
    return torch.where(zero, torch.zeros_like(s), torch.where(zero, torch.ones_like(s), s).sqrt())


def per_sample_norm(t: Tensor) -> Tensor:
    """l2 norm over every non-batch dimension, shape (B,), with a finite gradient at ``t = 0``.

    ‖t‖ has no derivative at 0; autograd's ``norm`` returns NaN there, which is how a single dead-ReLU
    sample turns a whole batch's gradient into NaN. Here the derivative at 0 is taken as 0 (a valid
    subgradient), so training carries on. A row holding NaN gives NaN and a row holding inf gives inf
    (never a finite norm). Half inputs are accumulated in float32 (as ``torch.linalg.vector_norm``), the
    result has ``t``'s dtype; an empty batch gives an empty result.

    Example:


        >>> per_sample_norm(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        tensor([5., 0.])
    """
    return safe_sqrt(squared_norms(t)).to(t.dtype)


def real_view(t: Tensor) -> Tensor:
    """``t``, or for a complex tensor its (real, imaginary) pairs (``torch.view_as_real``): a complex parameter is two
    real coordinates, and torch packs a gradient (and a Hessian-vector product) w.r.t. a + ib as ∂/∂a + i·∂/∂b.

    Example:


        >>> real_view(torch.tensor([1 + 2j])).tolist()
        [[1.0, 2.0]]
    """
    return torch.view_as_real(t) if t.is_complex() else t


def tensor_norms(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """The l2 norm of each tensor, shape (K,), by ``torch.linalg.vector_norm``; for tensors without a graph (gradients,
    sparse ones included).

    `total_norm` is the norm of this vector. The monitors keep it and take that last norm on the host,
    with the other logged values (one host transfer a step, no extra kernel).

    Example:


        >>> tensor_norms([torch.tensor([3.0]), torch.tensor([4.0, 0.0])])
        tensor([3., 4.])
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0)
    device = tensors[0].device  # tensors on several devices: the norms are gathered on the first one's
    # a sparse gradient (nn.Embedding(sparse=True)) by its values, summed over repeated indices first
    return torch.stack([torch.linalg.vector_norm(t.coalesce().values() if t.is_sparse else t).to(device)
                        for t in tensors])  # mixed dtypes promote


def total_norm(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """‖(t₁, …, tₖ)‖: the l2 norm of all the tensors together (e.g. ‖∇θL‖ of a step), not differentiable.

    The value of `torch.nn.utils.get_total_norm` (the norm of `tensor_norms`, 0 for no tensors),
    without its grouping of the tensors by device and dtype: the parameter penalty runs this on every step,
    where that bookkeeping costs as much as the norms.

    Example:


        >>> total_norm([torch.tensor([3.0]), torch.tensor([4.0, 0.0])])
        tensor(5.)
    """
    return torch.linalg.vector_norm(tensor_norms(tensors))


def squared_norm_sum(tensors: list[Tensor] | tuple[Tensor, ...]) -> Tensor:
    """Σₖ ‖tₖ‖² over a list of tensors (e.g. the gradient of every parameter): ‖∇θL‖².

    Differentiable when a tensor carries a graph (double backprop); otherwise one fused norm over all the
    tensors (`total_norm`, one norm kernel per tensor) instead of a square, a sum and an add per tensor:
    this runs on every step of the parameter penalty.

    Example:


        >>> squared_norm_sum([torch.tensor([3.0]), torch.tensor([4.0, 0.0])])
        tensor(25.)
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        # a complex tensor by its real and imaginary parts: |z|², not z², which is complex
        return sum(real_view(t).square().sum() for t in tensors)
    return total_norm(tensors).square()
