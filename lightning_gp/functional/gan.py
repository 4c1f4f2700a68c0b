"""Critic regularizers for Wasserstein GANs: WGAN-GP and its variants.

All take the critic as a callable and return a scalar mean over samples; the weight (λ) is the
caller's. Real and fake samples are detached here: a critic penalty never sends gradient into the
generator.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_gp.functional._checks import (
    check_batched,
    check_callable,
    check_finite,
    check_floating_input,
    check_non_empty_batch,
    check_per_sample,
    check_same_shape,
)
from lightning_gp.functional.gradients import per_sample_norm
from lightning_gp.functional.penalties import (
    Params,
    PenaltyGradient,
    data_gradient_penalty,
    data_gradient_penalty_fd,
)

Critic = Callable[[Tensor], Tensor]


def _check_pair(real: Tensor, fake: Tensor, what: str | None = None) -> None:
    """Floating (real, fake) of one shape; with ``what`` (a mean over samples), a non-empty batch."""
    check_floating_input(real, "real", requires_grad=False)
    check_floating_input(fake, "fake", requires_grad=False)
    check_same_shape(real, fake, "real", "fake")
    if what is not None:
        check_non_empty_batch(real, "real", what)


def _call(critic: object, x: Tensor) -> Tensor:
    """``critic(x)``, with a clear error for a critic that is not callable or returns no tensor."""
    check_callable(critic, "critic", "a callable (a module or function) mapping samples to scores")
    scores = critic(x)
    if not isinstance(scores, Tensor):
        raise TypeError(f"`critic` must return a tensor of per-sample scores, got {type(scores).__name__}.")
    return scores


def _check_alpha(alpha: Tensor, batch: int, name: str = "alpha") -> Tensor:
    check_batched(alpha, name)
    if alpha.numel() != batch:
        raise ValueError(
            f"`{name}` must hold one value per sample ({batch}), got shape {tuple(alpha.shape)}. "
            "WGAN-GP draws one α per sample, not one per batch or per element."
        )
    if not alpha.is_floating_point():
        raise TypeError(f"`{name}` must be floating point (weights in [0, 1]), got dtype {alpha.dtype}. "
                        f"Pass e.g. `torch.rand({batch})`.")
    outside = ~((alpha >= 0) & (alpha <= 1))  # NaN is outside too
    if alpha.device.type != "cpu":
        # On an accelerator the check would cost a host sync every critic step: a value outside [0, 1] becomes
        # NaN instead, visible in the penalty (and reported by the WGAN mixin's and callbacks' finite check).
        return torch.where(outside, torch.nan, alpha).reshape(batch)
    if bool(outside.any()):
        bad = alpha.reshape(batch)[outside.reshape(batch)][:3].tolist()
        raise ValueError(
            f"`{name}` must lie in [0, 1] (a point on the segment from fake to real), got values {bad}. "
            f"Draw it as `torch.rand(B)` or clamp it to [0, 1]."
        )
    return alpha.reshape(batch)


def interpolate(real: Tensor, fake: Tensor, alpha: Tensor | None = None) -> Tensor:
    """x̂ = α·real + (1 − α)·fake with one α ~ U[0, 1] per sample, broadcast over all other dims.

    Args:
        real: the real batch.
        fake: the generated batch, of the same shape.
        alpha: optional per-sample weights in [0, 1], shape (B,) or any shape with B elements. On CPU a value
            outside [0, 1] raises; on an accelerator it gives NaN rows instead (no host sync per call).

    Example:


        >>> real, fake = torch.ones(4, 3, 8, 8), torch.zeros(4, 3, 8, 8)
        >>> x_hat = interpolate(real, fake)
        >>> bool((x_hat.flatten(1).std(dim=1) == 0).all())  # one α per sample
        True
    """
    _check_pair(real, fake)
    batch = real.shape[0]
    if alpha is None:
        alpha = torch.rand(batch, device=real.device, dtype=real.dtype)
    alpha = _check_alpha(alpha, batch).to(device=real.device, dtype=real.dtype).reshape(batch, *([1] * (real.ndim - 1)))
    return alpha * real + (1 - alpha) * fake


def wgan_gradient_penalty(
    critic: Critic,
    real: Tensor,
    fake: Tensor,
    *,
    alpha: Tensor | None = None,
    center: float = 1.0,
    one_sided: bool = False,
) -> Tensor:
    """E[(‖∇D(x̂)‖ − center)²] on per-sample interpolates (Gulrajani et al. 2017), differentiable.

    ``one_sided=True`` penalises only ‖∇D‖ > center, i.e. E[max(0, ‖∇D(x̂)‖ − center)²].

    Example:


        >>> critic = torch.nn.Linear(2, 1)
        >>> gp = wgan_gradient_penalty(critic, torch.randn(8, 2), torch.randn(8, 2))
        >>> torch.allclose(gp, (critic.weight.norm() - 1) ** 2)
        True
    """
    _check_pair(real, fake, "wgan_gradient_penalty")
    x_hat = interpolate(real.detach(), fake.detach(), alpha).requires_grad_(True)
    scores = check_per_sample(_call(critic, x_hat), x_hat.shape[0], "critic(x_hat)")
    return data_gradient_penalty(scores, x_hat, power=2, center=center, one_sided=one_sided)


def wgan_gradient_penalty_fd(
    critic: Critic,
    real: Tensor,
    fake: Tensor,
    params: Params,
    *,
    alpha: Tensor | None = None,
    center: float = 1.0,
    one_sided: bool = False,
    step: float | None = None,
) -> PenaltyGradient:
    """`wgan_gradient_penalty` and ≈ its parameter gradient by finite differences.

    For critics that cannot be double-differentiated (``torch.compile``, fused attention). See
    `data_gradient_penalty_fd` for the step size and its error.

    Example:


        >>> critic = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        >>> res = wgan_gradient_penalty_fd(critic, torch.randn(8, 2), torch.randn(8, 2), critic)
        >>> res.penalty.shape
        torch.Size([])
    """
    _check_pair(real, fake, "wgan_gradient_penalty_fd")
    x_hat = interpolate(real.detach(), fake.detach(), alpha)
    return data_gradient_penalty_fd(
        critic, x_hat, params, power=2, center=center, one_sided=one_sided, step=step
    )


def r1_penalty(critic: Critic, real: Tensor) -> Tensor:
    """R1: E[‖∇D(x)‖²] on real samples (Mescheder et al. 2018; StyleGAN2 uses γ/2 · R1).

    Example:


        >>> critic = torch.nn.Linear(2, 1)
        >>> torch.allclose(r1_penalty(critic, torch.randn(8, 2)), critic.weight.square().sum())
        True
    """
    return _zero_centred(critic, real, "real", "r1_penalty")


def r2_penalty(critic: Critic, fake: Tensor) -> Tensor:
    """R2: E[‖∇D(x̃)‖²] on generated samples. See `r1_penalty`.

    Example:


        >>> critic = torch.nn.Linear(2, 1)
        >>> torch.allclose(r2_penalty(critic, torch.randn(8, 2)), critic.weight.square().sum())
        True
    """
    return _zero_centred(critic, fake, "fake", "r2_penalty")


def _zero_centred(critic: Critic, samples: Tensor, name: str, owner: str) -> Tensor:
    """E[‖∇D(x)‖²] on ``samples`` (R1 on the real ones, R2 on the generated ones)."""
    check_floating_input(samples, name, requires_grad=False)
    check_non_empty_batch(samples, name, owner)
    x = samples.detach().requires_grad_(True)
    scores = check_per_sample(_call(critic, x), x.shape[0], f"critic({name})")
    return data_gradient_penalty(scores, x, power=2, center=0.0)


def difference_penalty(
    critic: Critic,
    real: Tensor,
    fake: Tensor,
    *,
    alpha: tuple[Tensor, Tensor] | None = None,
    center: float = 1.0,
) -> Tensor:
    """Derivative-free Lipschitz penalty E[(|D(x₁) − D(x₂)| / ‖x₁ − x₂‖ − center)²].

    x₁ and x₂ are two interpolates of the same (real, fake) pair with independent per-sample α, so
    the quotient is the critic's slope along that segment, a difference quotient standing in for
    ‖∇D‖ (no gradient of a gradient at all). Pairs closer than 1e-12 are left out of the mean.

    Example:


        >>> critic = torch.nn.Linear(2, 1, bias=False)
        >>> real, fake = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
        >>> with torch.no_grad():
        ...     _ = critic.weight.copy_(torch.tensor([[3.0, 0.0]]))
        >>> round(float(difference_penalty(critic, real, fake)), 4)  # slope 3: (3 - 1)² = 4
        4.0
    """
    _check_pair(real, fake, "difference_penalty")
    center = check_finite(center, "center", hint="The target slope of a 1-Lipschitz critic is center=1.")
    batch = real.shape[0]
    if alpha is None:
        a1 = a2 = None
    elif isinstance(alpha, (tuple, list)) and len(alpha) == 2:
        a1, a2 = alpha  # each checked by `interpolate`
    else:
        raise ValueError(f"`alpha` must be a pair (alpha1, alpha2) of per-sample weights or None, got "
                         f"{type(alpha).__name__}. Pass e.g. `(torch.rand(B), torch.rand(B))`.")
    real, fake = real.detach(), fake.detach()
    x1, x2 = interpolate(real, fake, a1), interpolate(real, fake, a2)
    scores = check_per_sample(_call(critic, torch.cat([x1, x2])), 2 * batch, "critic(x)")
    d1, d2 = scores[:batch], scores[batch:]
    dist = per_sample_norm(x1 - x2)
    valid = ~(dist <= 1e-12)  # a NaN distance (NaN samples) stays in the mean, visibly
    slope = (d1 - d2).abs() / torch.where(valid, dist, torch.ones_like(dist))
    terms = (slope - center).square()
    return terms[valid].mean() if bool(valid.any()) else terms.sum() * 0
