"""Virtual adversarial training (Miyato et al. 2018): the KL term and the power iteration for its direction.

r_vadv = ε·d with d the top eigenvector of the per-sample Hessian of r ↦ KL(p(·|x) ‖ p(·|x + r)) at r = 0,
found by power iterations d ← ∇_r KL at r = ξd (the gradient there is ξ·H·d to first order; the KL's
gradient at 0 is exactly 0). ξ must be small for truncation and large for rounding: see
:func:`virtual_adversarial_xi`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gp.functional._checks import check_positive_int
from lightning_gp.functional.adversarial import ascent_direction
from lightning_gp.functional.gradients import per_sample_norm
from lightning_gp.functional.precision import compute_dtype, difference_scale

__all__ = ["kl_divergence", "virtual_adversarial_direction", "virtual_adversarial_xi"]


def kl_divergence(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """Mean over the batch of KL(p ‖ q) between the categorical distributions of two logit tensors.

    Example:


        >>> logits = torch.tensor([[1.0, 2.0, 0.5]])
        >>> float(kl_divergence(logits, logits))
        0.0
    """
    p_log = F.log_softmax(p_logits, dim=-1)
    q_log = F.log_softmax(q_logits, dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(dim=-1).mean()


def virtual_adversarial_xi(base: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The default ξᵢ = ε_c^(1/3)·‖xᵢ‖, shaped to broadcast over ``base`` (ε_c: :func:`difference_scale` of the
    dtype the pass computes in). A zero sample takes the batch's mean norm, an all-zero batch 1.

    Relative to the input because ``x + ξd`` must keep ξd's digits: a fixed ξ = 1e-6 (the paper's code) is
    below float32's resolution of a unit-scale input and gave directions at |cos| 0.0–0.8 to the exact one.

    Example:


        >>> xi = virtual_adversarial_xi(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> xi.shape, bool(xi[0] == xi[1])
        (torch.Size([2, 1]), True)
    """
    norms = per_sample_norm(base.detach().float())
    nonzero = norms > 0
    fill = norms.sum() / nonzero.sum().clamp_min(1)
    norms = torch.where(nonzero, norms, torch.where(fill > 0, fill, torch.ones_like(fill)))
    xi = difference_scale(dtype or compute_dtype(base)) * norms
    return xi.reshape(-1, *([1] * (base.ndim - 1))).to(base.dtype)


def virtual_adversarial_direction(
    kl_at: Callable[[Tensor], Tensor],
    base: Tensor,
    *,
    xi: float | Tensor | None = None,
    power_iterations: int = 1,
    generator: torch.Generator | None = None,
    masked: Callable[[Tensor], Tensor] | None = None,
    owner: str = "virtual_adversarial_direction",
    what: str = "perturbation",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Unit direction dᵢ per sample that ``power_iterations`` steps bring towards the KL's top eigenvector.

    Args:
        kl_at: r ↦ KL(p(·|x) ‖ p(·|x + r)) (summed or averaged over the batch), p(·|x) detached.
        base: the unperturbed x (or a layer's output), which fixes the shape and the default ξ.
        xi: ξ > 0 (a number or a per-sample tensor); None: :func:`virtual_adversarial_xi` of ``base``.
        power_iterations: ≥ 1.
        generator: draws the random start (a resumed run draws the same one).
        masked: zeroes the padded positions of an input-shaped tensor (they are never perturbed).
        owner, what: name the caller and the perturbed tensor in the error message.
        dtype: the dtype the passes compute in, for the default ξ (default: ``base``'s, or autocast's).

    Raises:
        ValueError: the KL does not depend on r.

    Example:


        >>> net = torch.nn.Linear(3, 4)
        >>> x = torch.randn(5, 3)
        >>> clean = net(x).detach()
        >>> d = virtual_adversarial_direction(lambda r: kl_divergence(clean, net(x + r)), x)
        >>> torch.allclose(d.norm(dim=1), torch.ones(5))
        True
    """
    power_iterations = check_positive_int(power_iterations, "power_iterations")
    masked = masked or (lambda t: t)
    base = base.detach()
    if xi is None:
        xi = virtual_adversarial_xi(masked(base), dtype)
    start = torch.randn(base.shape, generator=generator, device=base.device, dtype=base.dtype)
    d = ascent_direction(masked(start), "l2")
    for _ in range(power_iterations):
        r = (xi * d).requires_grad_(True)
        (grad,) = torch.autograd.grad(kl_at(r), r, allow_unused=True)
        if grad is None:
            raise ValueError(f"{owner}: the logits do not depend on the perturbed {what}.")
        d = ascent_direction(masked(grad), "l2")
    return d
