"""DataGradientPenalty: weight · mean φ(‖∇ₓℓᵢ‖) added to the training loss of an unchanged module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch  # noqa: F401  (the docstring example)
from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks._method import Method, MethodChoice
from lightning_gp.functional import gradient_norm_penalty
from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import check_bool, check_choice, check_number, check_penalty_shape
from lightning_gp.functional._rng import RNGState
from lightning_gp.functional.penalties import (
    finite_difference_direction,
    input_difference,
    input_step_from_statistics,
    input_step_statistics,
)
from lightning_gp.functional.precision import default_step
from lightning_gp.step._batch import InputKey
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import REDUCTIONS, Objective, Reduction
from lightning_gp.step._reduction import check_reduction
from lightning_gp.step._site import Probe, Site, SiteCallback, Target


class DataGradientPenalty(MethodChoice, SiteCallback, PenaltyCallback):
    r"""Adds ``weight · mean_i φ(‖∇ₓℓᵢ‖)`` to the loss, φ(n) = (n − center)^power (or max(0, ·) one-sided).

    ``power=1`` is ε‖∇ₓℓ‖ (first-order FGSM training), ``power=2`` double backpropagation (Drucker & LeCun).
    Logs ``penalty/data_gradient`` (mean φ, unweighted). [Design](../design/loss-reduction.md).

    Args:
        weight: λ ≥ 0.
        power: p ≥ 1 of φ.
        center: c ≥ 0 of φ (1 for the WGAN-GP form).
        one_sided: penalise only norms above ``center``.
        input_key: the input in the batch: an index, a dict key, or a callable returning the batch's tensor.
        target: use this layer's output instead of the batch input (dotted path or ``nn.Module``).
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        every_n_steps: lazy regularization: the penalty on every k-th optimizer step with weight × k.
        method: ``"double_backward"`` (exact), ``"finite_difference"`` (one extra ordinary pass), or ``"auto"``
            (the first where the model has a double backward, decided at the first step; SDPA/compile have none).
        loss_reduction: ``"mean"`` or ``"sum"``: how ``training_step`` reduced the per-sample losses.
        step: relative input displacement of the finite difference; None: 1e-2, or ε^(2/3) of the compute dtype.
        check_finite: check each step's loss, penalty and gradients before the update.
        check_reduction: check ``loss_reduction`` on the two half-batches of the first penalized step.

    Raises:
        ValueError, TypeError: a bad argument; a loss that acts as the other ``loss_reduction`` or ignores the input.
        FloatingPointError: a step whose loss, penalty or gradient (after DDP's all-reduce) is NaN/Inf.

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> mse = lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1])
        >>> total = penalized_loss(net, mse, (x, y), [DataGradientPenalty(0.1, power=1)])
        >>> per_sample = (2 * (net(x) - y).abs() * net.weight.norm()).mean()  # ‖∇ₓℓᵢ‖ = 2|fᵢ − yᵢ|·‖w‖
        >>> torch.allclose(total, mse((x, y)) + 0.1 * per_sample)
        True
    """

    order = ORDER["DataGradientPenalty"]  # its place in the chain: _chain.ORDER
    log_name = "penalty/data_gradient"

    def __init__(
        self,
        weight: float,
        *,
        power: float = 2,
        center: float = 0.0,
        one_sided: bool = False,
        input_key: InputKey = None,
        target: Target = None,
        mask_key: str | None = None,
        every_n_steps: int = 1,
        method: Method = "auto",
        loss_reduction: Reduction = "mean",
        step: float | None = None,
        check_finite: bool = True,
        check_reduction: bool = True,
    ) -> None:
        super().__init__(weight, every_n_steps, check_finite)
        self.check_reduction = check_reduction
        self._reduction_checked = False
        owner = type(self).__name__
        check_penalty_shape(power, center)
        power = check_number(power, "power", owner, low=1, fix="Use power=1 for ε‖∇ₓℓ‖, power=2 for λ‖∇ₓℓ‖².")
        center = check_number(center, "center", owner)
        self.power, self.center = power, center
        self.one_sided = check_bool(one_sided, "one_sided", owner)
        self.check_reduction = check_bool(check_reduction, "check_reduction", owner)
        self.input_key, self.target, self.mask_key = input_key, target, mask_key
        self.site = Site(target, input_key, mask_key, owner)
        self.init_method(method)
        self.loss_reduction = check_choice(loss_reduction, "loss_reduction", REDUCTIONS, owner)
        self.step = None if step is None else check_number(step, "step", owner, strict=True)
        if self.form():  # λ‖∇ₓℓ‖² and ε‖∇ₓℓ‖ side by side log under two names
            self.log_name = type(self).log_name + "/" + ",".join(
                f"{k}={v}" if isinstance(v, bool) else f"{k}={v:g}" for k, v in self.form().items()
            )

    def state_key_fields(self) -> dict[str, Any]:
        # the penalty's shape is which penalty it is (λ‖∇ₓℓ‖² and ε‖∇ₓℓ‖ train side by side), not a tuned setting
        return {**super().state_key_fields(), **self.form()}

    def form(self) -> dict[str, Any]:
        """The penalty's shape φ where it differs from the default (n²): ``power``, ``center``, ``one_sided``."""
        defaults = {"power": 2, "center": 0.0, "one_sided": False}
        return {k: getattr(self, k) for k, v in defaults.items() if getattr(self, k) != v}

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        weight = self.active_weight(ctx)
        if weight == 0:
            return inner(batch)
        owner = type(self).__name__
        # probe → inner step, with δ a zero leaf on the input (or the target's output)
        probe = self.site.probe(ctx.module, batch)
        method = self.resolved_method or "double_backward"  # `prepare` decided "auto" (or had nothing to try it on)
        device = probe.x.device if probe.x is not None else next(ctx.module.parameters()).device
        before = RNGState.capture(device) if method != "double_backward" else None  # replayed at x + h·d
        objective, leaf = probe.run(inner, chain=True)
        loss, n = objective.loss, probe.base.shape[0]
        if self.check_reduction and not self._reduction_checked:
            self._reduction_checked = True
            check_reduction(owner, self.loss_reduction, lambda half: ctx.extra_loss(half, "fork"), batch, n, loss,
                            ctx.broadcast if ctx.world_size > 1 else None)
        scale = float(n) if self.loss_reduction == "mean" else 1.0  # S = Σᵢ ℓᵢ: B·L for a mean, L for a sum

        if method == "double_backward":
            penalty = self._double_backward_penalty(loss, leaf, scale)
            objective = objective.add(weight * penalty)
        else:
            # ∇ₓL with ∇L of every other leaf (the parameters) in one backward; the loss is linearised
            # (`Objective.loss_grads`): the final backward runs through the second pass's graph only, two backward
            # passes a step as in a hand-written loop, not three
            if loss.requires_grad:
                objective = objective.loss_grads(retain=ctx.loss_graph_needed_outside(self), private=(leaf,))
            penalty, h, moved = self._difference_point(ctx, probe, objective, leaf, scale)
            # ∇θ mean φ ≈ [∇θ S(x + h·d) − ∇θ S(x)] / (h·B): one extra pass at x + h·d, the primary pass's dropout
            # masks replayed from `before`
            term = input_difference(lambda delta: probe.run(lambda b: ctx.extra_loss(b, before), delta)[0],
                                    moved, objective.linearised_loss, h=h, scale=scale / n)
            objective = objective.add(weight * penalty + weight * term)
        self.check_and_log(ctx, self.log_name, penalty, batch_size=n)
        self.applied += 1
        return objective

    def _difference_point(self, ctx: StepContext, probe: Probe, objective: Objective, leaf: Tensor,
                          scale: float) -> tuple[Tensor, float, Tensor]:
        """(mean φ, h, h·d) of the finite difference. Its input-sized temporaries (x, ∇ₓS, d) end with this call,
        before the second pass runs, as they would in a hand-written step's frame."""
        taken = objective.take_grad(leaf) if objective.grads is not None else None
        grad = self.site.input_gradient(taken) * scale
        phi, d = finite_difference_direction(grad, power=self.power, center=self.center, one_sided=self.one_sided)
        x = probe.masked(probe.base.detach())
        rel_step = self.step if self.step is not None else default_step("input", ctx.compute_dtype(probe.base))
        # the same h on every rank as one process on the combined batch: one gather of the statistics it needs
        h = input_step_from_statistics(ctx.gather(input_step_statistics(x, d)), rel_step)
        return phi.mean(), h, h * d.to(x.dtype)

    def _double_backward_penalty(self, loss: Tensor, leaf: Tensor, scale: float) -> Tensor:
        """mean φ(‖∇ₓS‖) with the graph of ∇ₓL (S = ``scale``·L), for the final backward to differentiate."""
        found = autograd_grad(loss, leaf, create_graph=True, retain_graph=True, allow_unused=True)[0] \
            if loss.requires_grad else None
        grad = self.site.input_gradient(found) * scale
        return gradient_norm_penalty(grad, power=self.power, center=self.center, one_sided=self.one_sided).mean()

    def trial_penalty(self, ctx: StepContext, batch: Any) -> Tensor:
        probe = self.site.probe(ctx.module, batch)
        loss, leaf = probe.run(lambda b: ctx.extra_loss(b, "fork"))
        return self._double_backward_penalty(loss, leaf, 1.0)
