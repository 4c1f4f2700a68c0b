"""AdversarialWeightPerturbation: the step at W + v, v each layer's move against the adversarial loss (Wu et al.)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.functional._autograd import Displacement
from lightning_gp.functional._checks import check_number, grads_or_zeros
from lightning_gp.functional.awp import ParamSelection, awp_parameters, awp_perturbation
from lightning_gp.step._chain import ORDER, StepContext, extra_pass
from lightning_gp.step._objective import Objective

#: The callbacks whose adversarial objective AWP perturbs the weights against.
ADVERSARIAL = ("AdversarialTraining", "TRADES", "MART")


class AdversarialWeightPerturbation(PenaltyCallback):
    r"""Adversarial weight perturbation (Wu et al. 2020) on top of ``AdversarialTraining``, ``TRADES`` or ``MART``.

    Per layer l, v_l = γ·‖W_l‖·d_l/(‖d_l‖ + 1e-20) (:func:`lightning_gp.functional.awp_perturbation`), d the gradient of
    the adversarial callback's objective at the adversarial examples it found, taken on an extra pass that leaves the
    BatchNorm statistics alone (the authors' proxy copy). The training passes run at W + v, the optimizer steps there,
    and v is subtracted after the step, as in the authors' code: weight decay therefore acts on W + v, where SAM's order
    (W back before the step) would differ by lr·wd·v. Under DDP, d is the mean over the ranks (the whole batch's, as
    the authors' DataParallel). Under gradient accumulation v is found on the first micro-batch of a step and held
    through the step. Logs ``adversarial/awp_gap``, the objective at W + v minus at W.

    Args:
        gamma: γ ≥ 0 (5e-3 in the authors' PGD-AT and TRADES runs).
        params: which parameters move: "weights" (named ``*weight*``, dimension > 1: the authors'), "all", or a
            callable ``(name, parameter) -> bool``.
        every_n_steps: perturb on every k-th optimizer step; plain adversarial steps in between.
        check_finite: check each step's loss, gap and gradients before the update.

    Raises:
        ValueError: a bad argument; at setup: no adversarial callback whose objective it can read, or SAM.

    Example:

        >>> import lightning as L
        >>> from lightning_gp import TRADES
        >>> trainer = L.Trainer(callbacks=[TRADES(8 / 255), AdversarialWeightPerturbation(5e-3)], logger=False)
    """

    order = ORDER["AdversarialWeightPerturbation"]  # its place in the chain: _chain.ORDER
    log_name = "adversarial/awp_gap"

    def __init__(self, gamma: float = 5e-3, *, params: ParamSelection = "weights", every_n_steps: int = 1,
                 check_finite: bool = True) -> None:
        super().__init__(1.0, every_n_steps, check_finite)
        owner = type(self).__name__
        self.gamma = check_number(gamma, "gamma", owner, fix="AWP's relative weight step, e.g. gamma=5e-3.")
        if not (params in ("weights", "all") or callable(params)):
            raise ValueError(f"{owner}(params={params!r}): `params` must be 'weights', 'all' or a callable "
                             f"(name, parameter) -> bool.")
        self.params = params
        self._held: Displacement | None = None  # W + v, from the step's first micro-batch until after the step
        self._stepped = False

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        names = [type(cb).__name__ for cb in trainer.callbacks]
        if not any(n in ADVERSARIAL for n in names):
            raise ValueError(f"{type(self).__name__} moves the weights against an adversarial objective: add one of "
                             f"{list(ADVERSARIAL)} beside it (it perturbs against that callback's loss).")
        if not any(type(cb).__name__ in ADVERSARIAL and getattr(cb, "announces_objective", True)
                   for cb in trainer.callbacks):
            raise ValueError(f"{type(self).__name__} perturbs against the adversarial callback's objective, which "
                             f"AdversarialTraining announces on the batch input only: not with `target=`, FreeLB "
                             f"(`average_steps=True`) or `eps_relative=True`. Use TRADES(target=...) on a layer, or "
                             f"AdversarialTraining on the input.")
        if "SharpnessAwareMinimization" in names:
            raise ValueError(f"{type(self).__name__} and SharpnessAwareMinimization both perturb the weights, and put "
                             f"them back at different times (after and before the optimizer step): use one of them.")

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        if ctx.global_step % self.every_n_steps != 0 or self.gamma == 0 or self._held is not None:
            return inner(batch)  # a later micro-batch of the step trains at the W + v its first one found
        ctx.weight_perturbers.append(perturb := lambda objective: self._perturb(ctx, objective))
        try:
            objective = inner(batch)
        finally:
            ctx.weight_perturbers.remove(perturb)
        if self._held is None:
            raise ValueError(f"{type(self).__name__}: no adversarial objective came to perturb against. It works with "
                             f"{list(ADVERSARIAL)}; AdversarialTraining on the batch input (not `target=` or FreeLB).")
        return objective

    def _perturb(self, ctx: StepContext, objective: Callable[[], Tensor]) -> None:
        """d at W on an extra pass (module state put back), v per layer, W ← W + v; the gap at W + v."""
        if self._held is not None:
            return
        params = awp_parameters(ctx.module.named_parameters(), self.params)
        if not params:
            raise ValueError(f"{type(self).__name__}: no trainable parameter is selected by `params={self.params!r}`.")
        with extra_pass(ctx.module), torch.enable_grad():
            loss = objective()
            found = torch.autograd.grad(loss, params, allow_unused=True)
        grads = grads_or_zeros(found, params, what="the adversarial objective", wrt="parameters")
        grads = ctx.average_over_ranks(list(grads))
        self._held = Displacement(params, awp_perturbation(params, grads, self.gamma), 1.0, withdrawable=True)
        self._stepped = False
        with extra_pass(ctx.module), torch.no_grad():
            gap = objective() - loss.detach()
        self.check_and_log(ctx, self.log_name, gap)
        self.applied += 1

    def _withdraw(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.withdraw()

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: torch.optim.Optimizer) -> None:
        self._stepped = self._held is not None
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._stepped:  # the optimizer stepped at W + v: v comes off now (the authors' order)
            self._stepped = False
            self._withdraw()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._withdraw()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._withdraw()
        super().teardown(trainer, pl_module, stage)
