"""TRADES (Zhang et al., ICML 2019): the clean loss plus β·(1/B)·Σᵢ KL(f(xᵢ) ‖ f(x'ᵢ)).

x' maximises the KL inside the ε-ball around x. As in the authors' code (yaodongyu/TRADES, ``trades_loss``): x' starts
at x + 0.001·N(0, I) (not clipped), and each of ``steps`` steps moves it by α·sign(∇KL) (l∞), projects it onto the
ball and clips it to the bounds; with l2 the step is α·g/‖g‖ (a random direction where g = 0), clipped to the bounds,
then renormed into the ball. The model is in eval mode while x' is found and in train mode for the loss, whose
forward passes run in the authors' order (x, then x', then x again for the KL's target). The KL's gradient flows
through both distributions, as the authors' ``KLDivLoss`` of ``softmax(model(x))`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._checks import check_batched, check_choice, check_clamp, check_number, check_positive_int
from lightning_gp.functional._state import module_mode
from lightning_gp.functional.adversarial import NORMS, Norm, _expand, ascent_direction, pgd_step, project
from lightning_gp.functional.gradients import per_sample_norm
from lightning_gp.functional.robust import check_inputs_in_bounds
from lightning_gp.functional.vat import kl_divergence

__all__ = ["START_STD", "AttackMode", "default_trades_step_size", "trades_adversarial", "trades_kl", "trades_loss"]

#: The standard deviation of the Gaussian start around x (the authors' 0.001).
START_STD = 1e-3
#: The model's mode while x' is found: "eval" as the authors' code, or "train".
AttackMode = Literal["eval", "train"]
ATTACK_MODES = ("eval", "train")


def default_trades_step_size(eps: float, steps: int, norm: Norm) -> float:
    """ε/4 for l∞ (2/255 at 8/255, the step of the authors' CIFAR-10 runs), 2ε/steps for l2 (their l2 rate).

    Example:

        >>> default_trades_step_size(0.1, 10, "linf"), default_trades_step_size(0.5, 10, "l2")
        (0.025, 0.1)
    """
    return eps / 4 if norm == "linf" else 2 * eps / steps


def trades_kl(clean_logits: Tensor, adv_logits: Tensor) -> Tensor:
    """(1/B)·Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ)) of two (B, C) logit tensors, differentiable through both.

    Example:

        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(trades_kl(z, z)), bool(trades_kl(z, z.flip(1)) > 0)
        (0.0, True)
    """
    return kl_divergence(clean_logits, adv_logits)


def trades_adversarial(
    logits_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    clean_logits: Tensor | None = None,
) -> Tensor:
    """TRADES' inner maximisation: x' in the ε-ball around ``x`` (and in ``bounds``) that maximises KL(f(x) ‖ f(x')).

    Args:
        logits_fn: maps a batch of inputs to (B, C) logits (the model, in the mode the caller chose).
        x: the clean batch.
        eps: the radius ε ≥ 0.
        norm: "linf" or "l2".
        steps: ascent steps.
        step_size: α; None: :func:`default_trades_step_size`.
        bounds: the box x' is clipped to after each step; None for none (a layer's output).
        generator: draws the Gaussian start (and l2's random directions where the gradient is 0).
        clean_logits: f(x), if the caller has it (detached here); else computed once.

    Raises:
        ValueError: a bad argument, or logits that do not depend on the input.

    Example:

        >>> net = torch.nn.Linear(4, 3)
        >>> x = torch.rand(8, 4)
        >>> x_adv = trades_adversarial(net, x, 0.1, steps=3)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6), bool(x_adv.min() >= 0)
        (True, True)
    """
    owner = "trades_adversarial"
    x = check_batched(x, "x").detach()
    with torch.enable_grad():
        clean = (logits_fn(x) if clean_logits is None else clean_logits).detach()
    return gaussian_start_ascent(lambda u: kl_divergence(clean, logits_fn(u)), x, eps, norm=norm, steps=steps,
                                 step_size=step_size, bounds=bounds, generator=generator, owner=owner)


def gaussian_start_ascent(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
    owner: str = "gaussian_start_ascent",
) -> Tensor:
    """The inner maximisation TRADES and MART share: from x + 0.001·N(0, I), ``steps`` ascent steps of ``loss_fn``
    (sign steps projected and clipped for l∞; the authors' l2 steps), clipped to ``bounds`` at the end."""
    x = check_batched(x, "x").detach()
    eps = check_number(eps, "eps", owner)
    norm = check_choice(norm, "norm", NORMS, owner)
    steps = check_positive_int(steps, "steps", owner)
    alpha = default_trades_step_size(eps, steps, norm) if step_size is None else check_number(
        step_size, "step_size", owner)
    bounds = check_clamp(bounds)
    if bounds is not None:  # clipping x' into a box x is not in would move it far outside the ε-ball
        check_inputs_in_bounds(x, bounds, "x")
    with torch.enable_grad():
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x_adv = x + START_STD * noise
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv, allow_unused=True)
            if grad is None:
                raise ValueError(f"{owner}: the logits do not depend on the input (no autograd path).")
            if norm == "linf":
                x_adv = pgd_step(x_adv.detach(), grad, epsilon=eps, step_size=alpha, norm="linf", origin=x,
                                 clamp=bounds)
            else:
                x_adv = x + _l2_step(x_adv.detach() - x, grad, x, eps, alpha, bounds, generator)
    return x_adv.detach() if bounds is None else x_adv.detach().clamp(*bounds)


def _l2_step(delta: Tensor, grad: Tensor, x: Tensor, eps: float, alpha: float, bounds: tuple[float, float] | None,
             generator: torch.Generator | None) -> Tensor:
    """The authors' l2 step: δ + α·g/‖g‖, x + δ clipped to the box, δ renormed into the ball. Where g = 0 their
    optimizer's gradient is replaced by a standard normal draw z, unnormalised: δ − α·z."""
    step = ascent_direction(grad, "l2")
    zero = per_sample_norm(grad) == 0
    if bool(zero.any()):
        noise = torch.randn(grad.shape, generator=generator, device=grad.device, dtype=grad.dtype)
        step = torch.where(_expand(zero, grad), -noise, step)
    delta = delta + alpha * step
    if bounds is not None:
        delta = (x + delta).clamp(*bounds) - x
    return project(delta, eps, "l2")


def trades_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    beta: float = 6.0,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    attack_mode: AttackMode = "eval",
    generator: torch.Generator | None = None,
) -> Tensor:
    """The TRADES loss of one step: CE(f(x), y) + β·(1/B)·Σᵢ KL(f(xᵢ) ‖ f(x'ᵢ)), the authors' ``trades_loss``.

    x' comes from :func:`trades_adversarial` with ``model`` in ``attack_mode``; the loss's passes run with the
    model in train mode, in the authors' order (x, x', x). Every submodule's mode is put back after.

    Args:
        model: maps inputs to (B, C) logits.
        x: the clean batch, inside ``bounds``.
        y: integer labels.
        eps: the radius ε.
        beta: β ≥ 0, the weight of the KL (6 in the authors' CIFAR-10 runs).
        norm: "linf" or "l2".
        steps: steps of the inner maximisation.
        step_size: α; None: ε/4 (l∞), 2ε/steps (l2).
        bounds: the input box (None: none).
        attack_mode: the model's mode while x' is found.
        generator: draws the start of x'.

    Example:

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> loss = trades_loss(net, x, y, eps=0.1)
        >>> loss.backward(); bool(loss > torch.nn.functional.cross_entropy(net(x), y))
        True
    """
    attack_mode = check_choice(attack_mode, "attack_mode", ATTACK_MODES, "trades_loss")
    beta = check_number(beta, "beta", "trades_loss")
    with module_mode(model, attack_mode == "train"):
        x_adv = trades_adversarial(model, x, eps, norm=norm, steps=steps, step_size=step_size, bounds=bounds,
                                   generator=generator)
    with module_mode(model, True):
        natural = F.cross_entropy(model(x), y)
        adv_logits = model(x_adv)  # the authors' order: x', then x again for the KL's target
        return natural + beta * trades_kl(model(x), adv_logits)
