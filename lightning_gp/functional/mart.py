"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

The loss replaces the clean one: the boosted cross-entropy of x' (the cross-entropy plus −log(1 − p'ₖ), k the most
probable wrong class at x'), plus β·(1/B)·Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ))·(1 − p(xᵢ)_yᵢ), which weighs the KL by how badly the
clean sample is classified. x' maximises the cross-entropy in the ε-ball, from x + 0.001·N(0, I), with the model in
eval mode. The constants are the authors' (YisenWang/MART, ``mart_loss``): 1.0001 and 1e-12 inside the logarithms,
1.0000001 in the weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._checks import check_choice, check_number
from lightning_gp.functional._state import module_mode
from lightning_gp.functional.adversarial import Norm
from lightning_gp.functional.trades import ATTACK_MODES, AttackMode, gaussian_start_ascent

__all__ = ["mart_adversarial", "mart_loss", "mart_terms"]

#: The authors' constants: inside the margin's logarithm, inside the KL's logarithm, in the KL's weight.
MARGIN_ONE, LOG_FLOOR, WEIGHT_ONE = 1.0001, 1e-12, 1.0000001


def mart_terms(clean_logits: Tensor, adv_logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """MART's two terms: (the boosted cross-entropy of x', (1/B)·Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ))·(1 − p(xᵢ)_yᵢ)).

    Example:

        >>> clean, adv = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.5, 1.0, -1.0]])
        >>> bce, kl = mart_terms(clean, adv, torch.tensor([0]))
        >>> bool(bce > torch.nn.functional.cross_entropy(adv, torch.tensor([0]))), bool(kl > 0)
        (True, True)
    """
    adv_probs = F.softmax(adv_logits, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])  # the most probable wrong class at x'
    boosted = F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(MARGIN_ONE - adv_probs + LOG_FLOOR), wrong)
    clean_probs = F.softmax(clean_logits, dim=1)
    true_probs = clean_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    kl = F.kl_div(torch.log(adv_probs + LOG_FLOOR), clean_probs, reduction="none").sum(1)
    return boosted, (kl * (WEIGHT_ONE - true_probs)).sum() / len(y)


def mart_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    steps: int = 10,
    step_size: float | None = None,
    bounds: tuple[float, float] | None = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> Tensor:
    """MART's x': ``steps`` ascent steps of the cross-entropy from x + 0.001·N(0, I) (the model in the caller's mode).

    ``model`` maps inputs to logits; ``step_size`` defaults to ε/4 (l∞), 2ε/steps (l2); the other arguments as in
    :func:`trades_adversarial`.

    Example:

        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> x_adv = mart_adversarial(net, x, y, 0.1, steps=3)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    return gaussian_start_ascent(lambda u: F.cross_entropy(model(u), y), x, eps, norm=norm, steps=steps,
                                 step_size=step_size, bounds=bounds, generator=generator, owner="mart_adversarial")


def mart_loss(
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
    """The MART loss of one step, the authors' ``mart_loss``: x' with the model in ``attack_mode``, then (train mode,
    x before x') the boosted cross-entropy of x' + β·the weighted KL (:func:`mart_terms`).

    Args:
        model: maps inputs to (B, C) logits; every submodule's mode is put back after.
        x: the clean batch, inside ``bounds``.
        y: integer labels.
        eps: the radius ε.
        beta: β ≥ 0 (6 in the authors' CIFAR-10 runs).
        norm: "linf" (the authors') or "l2".
        steps: steps of the inner maximisation.
        step_size: α; None: ε/4 (l∞), 2ε/steps (l2).
        bounds: the input box (None: none).
        attack_mode: the model's mode while x' is found.
        generator: draws the start of x'.

    Example:

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> loss = mart_loss(net, x, y, eps=0.1)
        >>> loss.backward(); bool(loss > 0)
        True
    """
    attack_mode = check_choice(attack_mode, "attack_mode", ATTACK_MODES, "mart_loss")
    beta = check_number(beta, "beta", "mart_loss")
    with module_mode(model, attack_mode == "train"):
        x_adv = mart_adversarial(model, x, y, eps, norm=norm, steps=steps, step_size=step_size, bounds=bounds,
                                 generator=generator)
    with module_mode(model, True):
        clean_logits = model(x)
        boosted, kl = mart_terms(clean_logits, model(x_adv), y)
        return boosted + beta * kl
