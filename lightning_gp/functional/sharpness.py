"""Sharpness: SAM's ascent step, and the loss Hessian's top eigenvalue and trace from Hessian-vector products.

SAM (Foret et al. 2021) trains on L(θ + ε) with ε = ρ·g/‖g‖, g = ∇θL: to first order L + ρ‖∇θL‖, the
adversarial twin of the parameter-gradient penalty, as one FGSM step is the twin of the input-gradient penalty.
ASAM (Kwon et al. 2021) scales the step by |θ|: ε = ρ·θ²⊙g/‖θ⊙g‖. The sharpness these methods act on is λ_max,
the largest eigenvalue of the loss Hessian; gradient descent at learning rate η drives it to about 2/η (the edge
of stability, Cohen et al. 2021). Design notes: ``docs/design/sharpness.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_gp.functional._autograd import displaced, explained_double_backward
from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import as_param_list, check_finite, check_positive_int, check_scalar
from lightning_gp.functional.gradients import real_view, squared_norm_sum, total_norm
from lightning_gp.functional.penalties import finite_difference_parameter_step
from lightning_gp.functional.precision import compute_dtype, default_step

#: A Hessian-vector product: the list v (shaped like the parameters) to H·v.
HVP = Callable[[list[Tensor]], list[Tensor]]


def sam_perturbation(params: Sequence[Tensor], grads: Sequence[Tensor], *, rho: float,
                     adaptive: bool = False) -> tuple[list[Tensor], float]:
    """SAM's ascent step ε = h·d, as the direction d and the scalar h.

    SAM: d = g, h = ρ/‖g‖. ASAM (``adaptive``): d = θ²⊙g, h = ρ/‖θ⊙g‖ (davda54/sam's ``adaptive=True``). The norms
    are over all parameters together. h is 0.0 for a zero gradient (no step) and NaN for a non-finite one, never a
    finite number hiding it; reading it is one host read.

    Example:


        >>> w = torch.tensor([3.0, 4.0])
        >>> d, h = sam_perturbation([w], [torch.tensor([0.6, 0.8])], rho=0.5)
        >>> h * d[0]  # ρ·g/‖g‖
        tensor([0.3000, 0.4000])
    """
    rho = check_finite(rho, "rho", hint="SAM's radius, e.g. 0.05 (SAM) or 0.5 to 2 (ASAM).")
    grads = [g.detach() for g in grads]
    if adaptive:
        thetas = [p.detach() for p in params]
        norm = total_norm([t.abs() * g for t, g in zip(thetas, grads, strict=True)])
        direction = [t.square() * g for t, g in zip(thetas, grads, strict=True)]
    else:
        norm, direction = total_norm(grads), grads
    value = float(norm)
    if value == 0 or not math.isfinite(value):
        return direction, 0.0 if value == 0 else math.nan
    return direction, rho / value


def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Σ⟨aᵢ, bᵢ⟩ over the parameters (real and imaginary parts for a complex one), in float64 (a Rayleigh quotient
    of a large model sums many terms)."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b, strict=True):
        total = total + (real_view(x).double() * real_view(y).double()).sum()
    return total


def _rademacher(like: Tensor, generator: torch.Generator | None) -> Tensor:
    """±1 in every real coordinate of ``like`` (both parts of a complex entry), in its dtype."""
    real = real_view(like)
    signs = torch.randint(0, 2, real.shape, generator=generator, device=like.device).to(real.dtype) * 2 - 1
    return torch.view_as_complex(signs) if like.is_complex() else signs


def _normalized(v: Sequence[Tensor]) -> list[Tensor]:
    norm = _dot(v, v).sqrt()
    return [t / norm.to(t.dtype) for t in v] if float(norm) > 0 else list(v)


def power_iteration(hvp: HVP, like: Sequence[Tensor], *, iterations: int = 20, tol: float = 1e-3,
                    generator: torch.Generator | None = None,
                    start: Sequence[Tensor] | None = None) -> tuple[Tensor, int]:
    """The Hessian eigenvalue of largest magnitude by power iteration on ``hvp``; returns it and the iterations.

    Starts from ``start`` or a Gaussian direction (``generator`` makes it a function of its seed), stops when the
    Rayleigh quotient vᵀHv moves by at most ``tol`` relative, or after ``iterations``. One host read per
    iteration. For a training loss this is λ_max (the top eigenvalue dominates); PyHessian computes the same.
    """
    if start is None:
        start = [torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype) for t in like]
    v = _normalized(start)
    previous = None
    for done in range(1, iterations + 1):
        hv = hvp(v)
        value = _dot(v, hv)
        v = _normalized(hv)
        current = float(value)
        if not math.isfinite(current) or (previous is not None and abs(current - previous) <= tol * abs(current)):
            return value, done
        previous = current
    return value, iterations


def hutchinson_trace(hvp: HVP, like: Sequence[Tensor], *, samples: int = 10,
                     generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson's estimate of tr H: the mean of vᵀHv over ``samples`` Rademacher vectors v (unbiased; drawn
    from ``generator``, so the same seed on every DDP rank gives every rank the same vectors)."""
    total = torch.zeros((), dtype=torch.float64, device=like[0].device)
    for _ in range(samples):
        v = [_rademacher(t, generator) for t in like]
        total = total + _dot(v, hvp(v))
    return total / samples


def double_backward_hvp(loss: Tensor, params: Sequence[Tensor]) -> HVP:
    """Hessian-vector products of ``loss`` w.r.t. ``params`` by double backward (one graph, reused)."""
    grads = autograd_grad(loss, list(params), create_graph=True, allow_unused=True)  # a clear error without one
    pairs = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        used = [vi for vi, g in zip(v, grads, strict=True) if g is not None]
        with explained_double_backward():  # the product is the double backward: a clear error where there is none
            out = iter(torch.autograd.grad([g for _, g in pairs], [p for p, _ in pairs], grad_outputs=used,
                                           retain_graph=True, allow_unused=True))
        result = []
        for p, g in zip(params, grads, strict=True):
            hv = next(out) if g is not None else None
            result.append(torch.zeros_like(p) if hv is None else hv)
        return result

    return hvp


def central_difference_hvp(loss_at: Callable[[], Tensor], params: Sequence[Tensor], *,
                           step: float | None = None) -> HVP:
    """Hessian-vector products without a double backward: H·v ≈ [∇L(θ + h·v) − ∇L(θ − h·v)] / 2h (error O(h²)),
    the twin of :func:`double_backward_hvp` for models that have none (SDPA attention, compiled modules).

    θ moves in place by ±h·v and comes back bit for bit; ``loss_at()`` recomputes the loss at the current θ (with
    the same random draws each time, if it has any). θ moves by ``step``·‖θ‖; None takes the package's default for
    the dtype the loss computes in (``precision.default_step("hvp", ...)``: 1e-3 in float32, √ε in bfloat16, where
    1e-3 measures rounding: cos 0.54 to the exact product).

    Example:


        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hvp = central_difference_hvp(lambda: (w**3).sum(), [w])  # H = diag(6w)
        >>> torch.allclose(hvp([torch.ones(2)])[0], torch.tensor([6.0, 12.0]), rtol=1e-4)
        True
    """
    params = list(params)

    def grad_at(v: list[Tensor], alpha: float) -> list[Tensor]:
        with displaced(params, v, alpha):
            grads = torch.autograd.grad(loss_at(), params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        v_norm = squared_norm_sum(v).sqrt()
        if float(v_norm) == 0:
            return [torch.zeros_like(p) for p in params]
        rel = step if step is not None else default_step("hvp", compute_dtype(params[0]))
        h = finite_difference_parameter_step(params, v_norm, rel)
        plus, minus = grad_at(v, h), grad_at(v, -h)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus, strict=True)]

    return hvp


def hessian_max_eigenvalue(loss: Tensor, params: torch.nn.Module | Sequence[Tensor], *, iterations: int = 100,
                           tol: float = 1e-4, generator: torch.Generator | None = None) -> Tensor:
    """λ_max of the Hessian of ``loss`` w.r.t. ``params`` (power iteration on double-backward products).

    Args:
        loss: a scalar with its autograd graph.
        params: a module or the tensors to differentiate.
        iterations: at most this many Hessian-vector products.
        tol: stop when the estimate moves by at most this, relative.
        generator: draws the start vector.

    Example:


        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> loss = 3 * w[0] ** 2 + 0.5 * w[1] ** 2  # H = diag(6, 1)
        >>> round(float(hessian_max_eigenvalue(loss, [w])), 4)
        6.0
    """
    loss = check_scalar(loss, "loss")
    params = as_param_list(params)
    iterations = check_positive_int(iterations, "iterations")
    tol = check_finite(tol, "tol", hint="A relative tolerance such as 1e-4.")
    value, _ = power_iteration(double_backward_hvp(loss, params), params, iterations=iterations, tol=tol,
                               generator=generator)
    return value.to(params[0].dtype)


def hessian_trace(loss: Tensor, params: torch.nn.Module | Sequence[Tensor], *, samples: int = 100,
                  generator: torch.Generator | None = None) -> Tensor:
    """Hutchinson's estimate of the trace of the Hessian of ``loss`` w.r.t. ``params`` (unbiased).

    Example:


        >>> w = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> loss = 3 * w[0] ** 2 + 0.5 * w[1] ** 2  # H = diag(6, 1): Rademacher vᵀHv = 7 exactly
        >>> float(hessian_trace(loss, [w], samples=4))
        7.0
    """
    loss = check_scalar(loss, "loss")
    params = as_param_list(params)
    samples = check_positive_int(samples, "samples")
    return hutchinson_trace(double_backward_hvp(loss, params), params, samples=samples,
                            generator=generator).to(params[0].dtype)
