"""Flooding: train on |L − b| + b, so the training loss floats around the flood level b."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.functional._checks import check_number
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective


class Flooding(PenaltyCallback):
    r"""Trains on ``|L − b| + b`` (Ishida et al. 2020, "Do we need zero training loss after achieving zero
    training error?"): gradient descent above the flood level b, gradient *ascent* below it.

    Link to the parameter-gradient penalty: once the loss hovers at b, a descent step and an ascent step
    alternate, and two such steps of size γ add up to about (γ²/2)·∇‖∇θL‖², a step on the penalty
    ‖∇θL‖² — the term :class:`ParameterGradientPenalty` adds explicitly. The flooded objective is applied
    to the raw loss of ``training_step``; the other callbacks' terms are added to it unchanged. Logs
    ``flooding/loss`` (L) and ``flooding/flooded`` (the fraction of steps below b over the epoch).

    Args:
        level: the flood level b ≥ 0 (about the training loss a well-generalising model keeps).
        check_finite: check each step's loss and gradients before the update (one host read a step).

    Example:


        >>> import torch
        >>> from lightning_gp.manual import penalized_loss
        >>> w = torch.tensor([2.0], requires_grad=True)
        >>> total = penalized_loss(torch.nn.Module(), lambda b: (w * b).sum(), torch.tensor([0.1]), [Flooding(0.5)])
        >>> round(float(total.detach()), 4), round(float(torch.autograd.grad(total, w)[0]), 4)  # L = 0.2 < b
        (0.8, -0.1)
    """

    order = ORDER["Flooding"]  # its place in the chain: _chain.ORDER

    def __init__(self, level: float, *, check_finite: bool = True) -> None:
        super().__init__(1.0, check_finite=check_finite)
        self.level = check_number(level, "level", type(self).__name__)

    def unsupported_when_sharded(self) -> str | None:
        return None  # input-space passes: every rank runs the whole (all-gathered) model on its own samples

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        objective = inner(batch)
        loss = objective.loss
        # |L − b| + b = L above b and 2b − L below: the term added to the objective is max(0, 2(b − L)),
        # whose gradient below b is −2∇L (with the loss's own ∇L through `loss_in_objective`: the flooded −∇L).
        # No host sync: the branch is a clamp.
        term = (2.0 * (self.level - objective.loss_in_objective)).clamp_min(0.0)
        self.record(ctx, "flooding/loss", loss, None)
        self.record(ctx, "flooding/flooded", (loss.detach() < self.level).to(loss.dtype), None)
        self.applied += 1
        return objective.add(term)
