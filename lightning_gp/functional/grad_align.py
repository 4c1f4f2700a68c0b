"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020): 1 − mean_i cos(∇ₓℓᵢ(x), ∇ₓℓᵢ(x + ηᵢ)), η ~ U[−ε, ε].

FGSM training overfits catastrophically when the loss stops being linear in the ε-ball: the gradient at x stops
pointing where the gradient at a random point of the ball points. GradAlign penalises that misalignment. As in the
authors' code (tml-epfl/understanding-fast-adv-training): the gradient at x is detached, the one at x + η is
differentiated (a double backward), η is not clipped to the input's box, and the mean runs over the samples whose two
gradients are both nonzero.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gp.functional._checks import check_batched, check_number
from lightning_gp.functional.adversarial import _expand
from lightning_gp.functional.gradients import per_sample_norm

__all__ = ["grad_align_cosines", "grad_align_penalty", "misalignment", "uniform_noise"]


def uniform_noise(like: Tensor, eps: float, generator: torch.Generator | None = None) -> Tensor:
    """η ~ U[−ε, ε], shaped like ``like``."""
    return torch.empty_like(like).uniform_(-eps, eps, generator=generator)


def grad_align_cosines(g1: Tensor, g2: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample cos(g1ᵢ, g2ᵢ) over all non-batch dims, and the mask of samples where both are nonzero (the
    cosine of the others is 0 and left out of the mean).

    Example:

        >>> g1, g2 = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[2.0, 2.0], [1.0, 0.0]])
        >>> cos, used = grad_align_cosines(g1, g2)
        >>> [round(float(c), 4) for c in cos], used.tolist()
        ([0.7071, 0.0], [True, False])
    """
    n1, n2 = per_sample_norm(g1), per_sample_norm(g2)
    used = (n1 != 0) & (n2 != 0)
    u1 = g1 / _expand(torch.where(used, n1, torch.ones_like(n1)), g1)
    u2 = g2 / _expand(torch.where(used, n2, torch.ones_like(n2)), g2)
    cos = (u1 * u2).flatten(1).sum(1) * used
    return cos, used


def misalignment(g1: Tensor, g2: Tensor) -> Tensor:
    """1 − mean cos(g1ᵢ, g2ᵢ) over the samples whose two gradients are nonzero; 0 where there is none (no gradient,
    nothing misaligned; the authors' mean over no sample would be NaN)."""
    cos, used = grad_align_cosines(g1, g2)
    return ((1 - cos) * used).sum() / used.sum().clamp_min(1)


def grad_align_penalty(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float,
    *,
    generator: torch.Generator | None = None,
    create_graph: bool = True,
) -> Tensor:
    """GradAlign's 1 − mean_i cos(∇ₓℓᵢ(x), ∇ₓℓᵢ(x + ηᵢ)) of a batch loss (mean or sum: the cosine ignores the scale).

    Args:
        loss_fn: maps a batch of inputs to the scalar loss (its gradient w.r.t. input i is sample i's).
        x: the batch.
        eps: the half-width ε of the uniform noise η (the attack's radius).
        generator: draws η.
        create_graph: keep the graph of the second gradient, so the penalty trains the parameters (double backward).

    Raises:
        ValueError: ε < 0, or a loss that does not depend on the input.

    Example:

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> penalty = grad_align_penalty(lambda u: torch.nn.functional.cross_entropy(net(u), y), x, 8 / 255)
        >>> 0 <= float(penalty) < 0.1  # a smooth net: the gradients barely turn within the ball
        True
    """
    x = check_batched(x, "x").detach()
    eps = check_number(eps, "eps", "grad_align_penalty")
    with torch.enable_grad():
        at_x = x.clone().requires_grad_(True)
        (g1,) = torch.autograd.grad(loss_fn(at_x), at_x, allow_unused=True)
        noisy = (x + uniform_noise(x, eps, generator)).requires_grad_(True)
        (g2,) = torch.autograd.grad(loss_fn(noisy), noisy, create_graph=create_graph, allow_unused=True)
    if g1 is None or g2 is None:
        raise ValueError("grad_align_penalty: `loss_fn(x)` does not depend on `x` (no autograd path).")
    return misalignment(g1.detach(), g2)
