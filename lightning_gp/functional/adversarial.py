"""FGSM and PGD adversarial inputs, in the l2 form of the source documents and the l∞ form of torchattacks.

One l2 FGSM step Δx = ε·gᵢ/‖gᵢ‖ raises the loss by ε‖gᵢ‖ to first order, so training on it is, to first
order, training with the penalty ε‖∇ₓℓ‖ (``data_gradient_penalty(..., power=1)``); the tests check
this link numerically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from lightning_gp.functional._checks import (
    check_bool,
    check_callable,
    check_choice,
    check_clamp,
    check_finite,
    check_floating_input,
    check_positive_int,
)
from lightning_gp.functional.gradients import per_sample_norm

#: The norms of the perturbation ball.
Norm = Literal["l2", "linf"]
NORMS: tuple[str, ...] = get_args(Norm)


def _expand(per_sample: Tensor, like: Tensor) -> Tensor:
    return per_sample.reshape(-1, *([1] * (like.ndim - 1)))


def _loss_gradient(loss_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇ₓ of the summed loss; never touches parameter ``.grad`` (only ``x`` is asked for)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise ValueError("`loss_fn(inputs)` must return a tensor computed from `inputs` (it has no graph).")
        (grad,) = torch.autograd.grad(loss.sum(), x, allow_unused=True)
    if grad is None:
        raise ValueError("`loss_fn(inputs)` does not depend on `inputs`: autograd found no path between them.")
    return grad


def ascent_direction(grad: Tensor, norm: Norm) -> Tensor:
    """Unit-size steepest-ascent direction per sample: g/‖g‖ (l2) or sign(g) (l∞); 0 where g = 0.

    A NaN or inf gradient gives NaN (``sign`` alone maps NaN to 0, a finite step hiding it); for finite g
    the l∞ direction is ``sign(g)`` bit for bit.
    """
    if norm == "linf":
        return grad.sign() + grad * 0
    n = per_sample_norm(grad)
    return grad / _expand(torch.where(n > 0, n, torch.ones_like(n)), grad)


#: A radius or a step length: one number, or one per sample (a (B,) tensor: ``AdversarialTraining(eps_relative=True)``).
Radius = float | Tensor


def project(delta: Tensor, epsilon: Radius, norm: Norm) -> Tensor:
    """``delta`` projected onto the ε-ball of ``norm``, per sample (over all non-batch dims); ε a number or (B,)."""
    if norm == "linf":
        if isinstance(epsilon, Tensor):
            radius = _expand(epsilon.to(delta.dtype), delta)
            return torch.minimum(torch.maximum(delta, -radius), radius)
        return delta.clamp(-epsilon, epsilon)
    n = per_sample_norm(delta)
    if isinstance(epsilon, Tensor):
        epsilon = epsilon.to(n.dtype)
    factor = torch.where(n > epsilon, epsilon / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))
    return delta * _expand(factor, delta)


def default_step_size(epsilon: float, steps: int, random_start: bool) -> float:
    """The step length when none is given: ε for FGSM, 1.25·ε for FGSM from a random start (Wong et al. 2020),
    2.5·ε/steps for PGD (Madry et al. 2018).

    Example:


        >>> default_step_size(0.1, 1, False), default_step_size(0.1, 1, True), default_step_size(0.1, 10, True)
        (0.1, 0.125, 0.025)
    """
    if steps == 1:
        return 1.25 * epsilon if random_start else epsilon
    return 2.5 * epsilon / steps


def pgd_step(point: Tensor, grad: Tensor, *, epsilon: Radius, step_size: Radius, norm: Norm,
             origin: Tensor | None = None, clamp: tuple[float, float] | None = None) -> Tensor:
    """One projected ascent step: ``point`` + α·(g/‖g‖ or sign g), projected onto the ε-ball around ``origin``
    (0 when None: ``point`` is then the perturbation δ itself), then into ``clamp``.

    The one PGD step of the package (:func:`pgd`, FreeLB, PGD on a layer's output), in torchattacks' order of
    operations on an input (step, project the difference to the origin, clamp).

    Example:


        >>> pgd_step(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]), epsilon=1.0, step_size=2.0, norm="l2")
        tensor([[0.6000, 0.8000]])
    """
    if isinstance(step_size, Tensor):  # one length per sample
        step_size = _expand(step_size.to(point.dtype), point)
    moved = point + step_size * ascent_direction(grad, norm)
    out = project(moved, epsilon, norm) if origin is None else origin + project(moved - origin, epsilon, norm)
    return out if clamp is None else out.clamp(*clamp)


def random_start(x: Tensor, epsilon: Radius, norm: Norm, *, mask: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """A uniform random point of the ε-ball around 0, shaped like ``x``; zero where ``mask`` (broadcast to
    ``x``) is 0. ``generator`` makes it a function of the generator's seed. The l∞ draw is torchattacks'. ε a number
    or one radius per sample, (B,)."""
    if isinstance(epsilon, Tensor):  # per sample: the unit ball's draw, scaled
        unit = random_start(x, 1.0, norm, mask=mask, generator=generator)
        return unit * _expand(epsilon.to(x.dtype), x)
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-epsilon, epsilon, generator=generator)
        return delta if mask is None else delta * mask
    # Uniform in the l2 ball: a Gaussian direction and radius ε·U^(1/d).
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if mask is not None:
        direction = direction * mask
    direction = direction / _expand(per_sample_norm(direction).clamp_min(1e-12), x)
    d = math.prod(x.shape[1:])
    radius = epsilon * torch.rand(x.shape[0], generator=generator, device=x.device, dtype=x.dtype).pow(1.0 / d)
    return direction * _expand(radius, x)


_draw_start = random_start  # `pgd`'s argument `random_start` shadows the function


def _check_common(loss_fn: object, inputs: Tensor, epsilon: float, norm: Norm, clamp: object, random_start: object,
                  generator: object) -> tuple[float, tuple[float, float] | None]:
    check_callable(loss_fn, "loss_fn", "a callable mapping inputs to losses")
    check_floating_input(inputs, "inputs", requires_grad=False)
    epsilon = check_finite(epsilon, "epsilon", hint="Pass the radius of the perturbation ball, e.g. 8/255 (l∞).")
    check_choice(norm, "norm", NORMS)
    check_bool(random_start, "random_start")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"`generator` must be a torch.Generator or None, got {type(generator).__name__}.")
    clamp = check_clamp(clamp)
    if clamp is not None and inputs.numel() > 0:
        lo, hi = torch.stack(torch.aminmax(inputs.detach())).tolist()  # one host sync
        if lo < clamp[0] or hi > clamp[1]:
            raise ValueError(
                f"`inputs` must lie inside `clamp` = {clamp}, got values in [{lo:g}, {hi:g}]: clamping them would "
                f"move them further than `epsilon` = {epsilon:g}. Scale or clamp the inputs into the range first, "
                f"or pass the range they live in (or clamp=None)."
            )
    return epsilon, clamp


def pgd(
    loss_fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    epsilon: float,
    norm: Norm = "l2",
    steps: int,
    step_size: float,
    random_start: bool = True,
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Projected gradient ascent on ``loss_fn`` within the ε-ball around ``inputs``. Returns detached inputs.

    Each step moves by ``step_size`` along g/‖g‖ (l2) or sign(g) (l∞), then projects back onto the
    ε-ball and into ``clamp``. Only ∇ₓ is computed: parameter ``.grad`` is left as it was.

    Args:
        loss_fn: maps inputs to per-sample losses, or their sum or mean (only the direction matters).
        inputs: the clean batch.
        epsilon: radius of the perturbation ball, >= 0.
        norm: "l2" or "linf".
        steps: number of ascent steps, >= 1.
        step_size: length of each step, > 0.
        random_start: start from a uniform point in the ball instead of ``inputs``.
        clamp: ``(lo, hi)`` valid range of the inputs, e.g. ``(0, 1)`` for images; ``inputs`` must lie in it
            (checked on the host: one sync).
        generator: draws the random start (default: the global RNG).

    Raises:
        ValueError: a bad or non-finite setting, or ``inputs`` outside ``clamp`` (the result would leave the ball).

    Example:


        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = lambda inp: torch.nn.functional.cross_entropy(model(inp), y, reduction="none")
        >>> x_adv = pgd(loss_fn, x, epsilon=0.1, norm="linf", steps=10, step_size=0.025, clamp=(0, 1))
        >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    epsilon, clamp = _check_common(loss_fn, inputs, epsilon, norm, clamp, random_start, generator)
    steps = check_positive_int(steps, "steps")
    step_size = check_finite(step_size, "step_size", strict=True, hint="Pass the length of one ascent step, e.g. "
                             "2.5·epsilon/steps.")
    x0 = inputs.detach()
    if x0.shape[0] == 0:  # an empty batch: nothing to perturb
        return x0.clone()
    x_adv = x0 + _draw_start(x0, epsilon, norm, generator=generator) if random_start else x0.clone()
    if clamp is not None:
        x_adv = x_adv.clamp(*clamp)
    # Iterate on x_adv itself, in torchattacks' order of operations (step, project x_adv − x0, clamp
    # x0 + δ): carrying δ instead rounds differently and drifts from torchattacks.PGD by an ulp.
    for _ in range(steps):
        grad = _loss_gradient(loss_fn, x_adv)
        x_adv = pgd_step(x_adv, grad, epsilon=epsilon, step_size=step_size, norm=norm, origin=x0, clamp=clamp)
    return x_adv.detach()


def fgsm(
    loss_fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    *,
    epsilon: float,
    norm: Norm = "l2",
    random_start: bool = False,
    step_size: float | None = None,
    clamp: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Fast gradient (sign) method: one ascent step of size ε. Returns detached inputs.

    ``norm="l2"``: Δ = ε·gᵢ/‖gᵢ‖ per sample (the source documents' form). ``norm="linf"``:
    Δ = ε·sign(g), identical to ``torchattacks.FGSM`` when ``clamp=(0, 1)``. With ``random_start``
    (Wong et al., "Fast is better than free") the step starts from a uniform point in the ball and has
    length ``step_size`` (default 1.25·ε), then is projected back onto the ε-ball. Without it, one step of
    min(``step_size``, ε) from the clean point, no projection. ``inputs`` must lie inside ``clamp``.

    Example:


        >>> model = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> loss_fn = lambda inp: torch.nn.functional.cross_entropy(model(inp), y, reduction="none")
        >>> x_adv = fgsm(loss_fn, x, epsilon=0.5)
        >>> torch.allclose((x_adv - x).norm(dim=1), torch.full((8,), 0.5))
        True
    """
    epsilon, clamp = _check_common(loss_fn, inputs, epsilon, norm, clamp, random_start, generator)
    if step_size is None:
        step_size = default_step_size(epsilon, 1, random_start)
    else:
        step_size = check_finite(step_size, "step_size", hint="Leave it None for ε (1.25·ε with random_start).")
    if epsilon == 0 or step_size == 0 or inputs.shape[0] == 0:
        return inputs.detach().clone()
    if random_start:
        return pgd(loss_fn, inputs, epsilon=epsilon, norm=norm, steps=1, step_size=step_size, random_start=True,
                   clamp=clamp, generator=generator)
    # One step from the clean point (inside `clamp`, checked): a step of min(step_size, ε) stays in the ε-ball,
    # so there is nothing to project (torchattacks.FGSM's operations, bit for bit).
    x0 = inputs.detach()
    x_adv = x0 + min(step_size, epsilon) * ascent_direction(_loss_gradient(loss_fn, x0), norm)
    if clamp is not None:
        x_adv = x_adv.clamp(*clamp)
    return x_adv.detach()
