"""Adversarial weight perturbation (Wu et al., NeurIPS 2020): each layer's weights moved against the adversarial loss.

Per layer l, v_l = γ·‖W_l‖·d_l/(‖d_l‖ + 1e-20), d the gradient of the adversarial objective at the adversarial examples
already found (the authors take it with one SGD step of a proxy copy of the model: the step's size cancels in the
ratio). Only weights of dimension > 1 move (convolution and linear weights, not biases or normalisation scales). The
training step then runs at W + v, the optimizer steps there, and v is subtracted after the step (csdongxian/AWP).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch  # noqa: F401  (the docstring examples)
from torch import Tensor

from lightning_gp.functional._checks import check_number

__all__ = ["AWP_EPS", "ParamSelection", "awp_parameters", "awp_perturbation"]

#: The authors' guard in ‖W‖/(‖d‖ + ε).
AWP_EPS = 1e-20
#: Which parameters move: "weights" (named ``*weight*``, dimension > 1: the authors'), "all", or a predicate on
#: (name, parameter).
ParamSelection = Literal["weights", "all"] | Callable[[str, Tensor], bool]


def awp_parameters(named: Iterable[tuple[str, Tensor]], select: ParamSelection = "weights") -> list[Tensor]:
    """The trainable parameters AWP moves, in order.

    Example:

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
        >>> [tuple(p.shape) for p in awp_parameters(net.named_parameters())]
        [(4, 3), (2, 4)]
    """
    if select == "weights":
        keep = lambda name, p: "weight" in name and p.ndim > 1  # noqa: E731
    elif select == "all":
        keep = lambda name, p: True  # noqa: E731
    elif callable(select):
        keep = select
    else:
        raise ValueError(f"`params` must be 'weights', 'all' or a callable (name, parameter) -> bool, got {select!r}.")
    return [p for name, p in named if p.requires_grad and keep(name, p)]


def awp_perturbation(params: Sequence[Tensor], grads: Sequence[Tensor], gamma: float) -> list[Tensor]:
    """AWP's per-layer displacement v_l = γ·‖W_l‖·d_l/(‖d_l‖ + 1e-20) of each of ``params``, d their ``grads``.

    Add it to the weights before the training step's forward, step the optimizer there, subtract it after.

    Args:
        params: the weights to move (:func:`awp_parameters`).
        grads: the gradients of the adversarial objective at the adversarial examples, one per weight.
        gamma: γ ≥ 0, the relative size of the move (5e-3 in the authors' runs).

    Example:

        >>> w = torch.tensor([[3.0, 4.0]])
        >>> awp_perturbation([w], [torch.tensor([[0.0, 2.0]])], gamma=0.1)  # γ·‖w‖ = 0.5 along d/‖d‖
        [tensor([[0.0000, 0.5000]])]
    """
    gamma = check_number(gamma, "gamma", "awp_perturbation")
    return [gamma * p.detach().norm() / (g.detach().norm() + AWP_EPS) * g.detach()
            for p, g in zip(params, grads, strict=True)]
