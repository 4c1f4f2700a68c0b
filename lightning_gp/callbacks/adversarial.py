"""AdversarialTraining: train on FGSM/PGD examples of an unchanged module's own loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback, Step, StepContext
from lightning_gp.callbacks._batch import InputKey, replace_input
from lightning_gp.callbacks.data_penalty import input_leaf
from lightning_gp.functional import fgsm, pgd
from lightning_gp.functional._checks import check_choice, check_clamp, check_non_negative, check_positive_int
from lightning_gp.functional.adversarial import NORMS, Norm


class AdversarialTraining(PenaltyCallback):
    r"""Trains on ``(1 − a)·L(x) + a·L(x_adv)``, x_adv an FGSM (``steps=1``) or PGD attack on the module's loss.

    The attack differentiates the returned loss w.r.t. the input only (no parameter ``.grad``, no DDP hook);
    only the gradient's direction matters, so the loss's reduction does not. ``norm="l2"`` steps along
    gᵢ/‖gᵢ‖ (to first order, the penalty ε‖∇ₓℓ‖), ``norm="linf"`` by sign (torchattacks' FGSM/PGD). Logs
    ``adversarial/loss`` and, when a clean loss is computed, ``adversarial/clean_loss``. Which pass is the
    primary one: ``docs/design/loss-changing-callbacks.md``.

    Args:
        epsilon: radius ε ≥ 0 of the perturbation ball.
        norm: ``"l2"`` or ``"linf"``.
        steps: 1 for FGSM, more for PGD.
        step_size: length of each step; default ε for FGSM (1.25·ε with ``random_start``, Wong et al.),
            2.5·ε/steps for PGD (Madry et al.).
        random_start: start from a uniform point in the ε-ball.
        clamp: ``(lo, hi)`` valid input range, e.g. ``(0, 1)`` for images.
        adversarial_weight: a ∈ [0, 1].
        input_key: which part of the batch is the input (see `DataGradientPenalty`).

    Raises:
        ValueError: an invalid argument, or an input the loss does not depend on.
        TypeError: the selected input is not floating point.

    Example:
        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> mse = lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1])
        >>> adversarial = penalized_loss(net, mse, (x, y), [AdversarialTraining(0.5)])
        >>> bool(adversarial > mse((x, y)))  # the loss at the FGSM point is higher
        True
    """

    order = 0

    def __init__(
        self,
        epsilon: float,
        *,
        norm: Norm = "l2",
        steps: int = 1,
        step_size: float | None = None,
        random_start: bool = False,
        clamp: tuple[float, float] | None = None,
        adversarial_weight: float = 1.0,
        input_key: InputKey = None,
    ) -> None:
        super().__init__(1.0)
        self.epsilon = check_non_negative(epsilon, "epsilon")
        self.norm = check_choice(norm, "norm", NORMS)
        self.steps = check_positive_int(steps, "steps")
        self.step_size = None if step_size is None else check_non_negative(step_size, "step_size")
        self.random_start = random_start
        self.clamp = check_clamp(clamp)
        a = check_non_negative(adversarial_weight, "adversarial_weight")
        if a > 1:
            raise ValueError(f"`adversarial_weight` must be in [0, 1], got {adversarial_weight!r}.")
        self.adversarial_weight = a
        self.input_key = input_key

    def state_key_fields(self) -> dict[str, Any]:
        return {} if self.input_key is None else dict(input_key=repr(self.input_key))

    def attack(self, ctx: StepContext, batch: Any, x: Tensor, path: tuple) -> tuple[Tensor, Tensor | None]:
        """The adversarial input, and the clean loss if the attack happened to compute it."""
        clean: list[Tensor] = []

        def loss_fn(inputs: Tensor) -> Tensor:
            loss = ctx.extra_loss(replace_input(batch, path, inputs))
            if not clean and not self.random_start and torch.equal(inputs, x):
                clean.append(loss.detach())
            return loss

        common = dict(epsilon=self.epsilon, norm=self.norm, random_start=self.random_start, clamp=self.clamp)
        if self.steps == 1:
            x_adv = fgsm(loss_fn, x, step_size=self.step_size, **common)
        else:
            step_size = self.step_size if self.step_size is not None else 2.5 * self.epsilon / self.steps
            x_adv = pgd(loss_fn, x, steps=self.steps, step_size=step_size, **common) if step_size > 0 else x
        return x_adv.to(x.dtype), (clean[0] if clean else None)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Step]) -> Step:
        a = self.adversarial_weight
        if a == 0:
            return inner(batch)
        x, path = input_leaf(ctx, batch, self.input_key, type(self).__name__)
        x_adv, clean_loss = self.attack(ctx, batch, x.detach(), path)
        adv_batch = replace_input(batch, path, x_adv)
        if a < 1:
            step = inner(batch)  # primary: clean
            adv_loss = ctx.extra_loss(adv_batch)
            clean_loss = step.loss
            # (1 − a)·L_clean + a·L_adv, with the inner callbacks' penalties kept at full weight. `stand_in`
            # has the clean loss's value and gradient (possibly without its graph, see `Step`).
            result = step.add(a * (adv_loss - step.stand_in))
        else:
            step = inner(adv_batch)  # primary: adversarial
            adv_loss = step.loss
            result = step
        n = x.shape[0]
        self.record(ctx, "adversarial/loss", adv_loss, n)
        if clean_loss is not None:
            self.record(ctx, "adversarial/clean_loss", clean_loss, n)
        self.applied += 1
        return result
