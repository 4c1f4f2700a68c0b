"""ParameterGradientPenalty: weight · ‖∇θL‖² (implicit gradient regularization, made explicit)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, get_args

import torch

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks._method import Method, MethodChoice
from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import check_choice, check_number, grads_or_zeros
from lightning_gp.functional._rng import RNGState
from lightning_gp.functional.gradients import squared_norm_sum
from lightning_gp.functional.penalties import parameter_difference, parameter_step_size
from lightning_gp.functional.precision import default_step
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective

#: Whose gradient each DDP rank penalises: its own batch's, or the one averaged over ranks.
Scope = Literal["local", "global"]
SCOPES: tuple[str, ...] = get_args(Scope)
#: Why ``scope="local"`` cannot run under FSDP2 (for the parameter penalty and SAM).
LOCAL_SCOPE_SHARDED = ("scope='local' moves each rank's parameters by its own gradient, and FSDP2's ranks share one "
                       "set of sharded parameters (use scope='global', the one-process result)")


class ParameterGradientPenalty(MethodChoice, PenaltyCallback):
    r"""Adds ``weight · ‖∇θL‖²`` to the loss; its gradient is 2w·H·∇θL.

    With ``weight = γ/4`` for the SGD learning rate γ it cancels the leading discretisation error of
    gradient descent (implicit gradient regularization, Barrett & Dherin). Logs ``penalty/parameter_gradient``
    (‖∇θL‖², before the weight). Design: [Finite differences](../design/finite-differences.md),
    [DDP scopes](../design/ddp.md).

    Args:
        weight: w ≥ 0.
        every_n_steps: lazy regularization: every k-th optimizer step with weight × k.
        method: ``"double_backward"``, ``"finite_difference"`` (a second pass at θ + h·∇θL, as in SAM, with the
            parameters displaced in place and restored bit for bit), or ``"auto"``: double backward where the
            model has one, else finite differences, decided before the first penalized step.
        scope: ``"local"`` (each DDP rank penalises its own gradient, as SAM does) or ``"global"`` (the
            gradient averaged over ranks inside the graph: the one-process result, one more collective).
        step: relative parameter displacement of the finite difference; None: 1e-3, or the unit roundoff of the
            dtype the passes compute in where larger (bf16-mixed: 0.0078).
        check_finite: check every step's loss, penalty and gradients before the update.

    Raises:
        ValueError: an invalid argument; a loss without an autograd graph or independent of the parameters.
        FloatingPointError: a step whose loss, penalty or gradient (after DDP's all-reduce) is NaN/Inf; every
            rank raises.

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> w = torch.nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda b: (w(b) ** 2).mean()
        >>> x = torch.randn(4, 2)
        >>> total = penalized_loss(w, loss_fn, x, [ParameterGradientPenalty(0.5)])
        >>> (g,) = torch.autograd.grad(loss_fn(x), [w.weight])
        >>> torch.allclose(total, loss_fn(x) + 0.5 * g.square().sum())
        True
    """

    order = ORDER["ParameterGradientPenalty"]  # its place in the chain: _chain.ORDER
    log_name = "penalty/parameter_gradient"

    def __init__(
        self,
        weight: float,
        *,
        every_n_steps: int = 1,
        method: Method = "auto",
        scope: Scope = "local",
        step: float | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(weight, every_n_steps, check_finite)
        self.init_method(method)
        self.scope = check_choice(scope, "scope", SCOPES, type(self).__name__)
        self.step = None if step is None else check_number(step, "step", type(self).__name__, strict=True)

    def unsupported_when_sharded(self) -> str | None:
        return super().unsupported_when_sharded() or (LOCAL_SCOPE_SHARDED if self.scope == "local" else None)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        weight = self.active_weight(ctx)
        if weight == 0:
            return inner(batch)
        params = self.trainable_parameters(ctx, "so ‖∇θL‖² has nothing to penalise")
        device = params[0].device
        method = self.resolved_method or "double_backward"  # `prepare` decided "auto" (or had nothing to try it on)
        before = RNGState.capture(device) if method != "double_backward" else None
        objective = inner(batch)
        loss = self.loss_with_graph(objective)
        double = method == "double_backward"
        if double:
            grads = autograd_grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
        else:
            # ∇L for every leaf of the loss in one backward; the loss is linearised (see `Objective.loss_grads`), so
            # the final backward runs through the second pass's graph only, as a hand-written loop would.
            objective = objective.loss_grads(retain=ctx.loss_graph_needed_outside(self))
            grads = [objective.grad_of(p) for p in params]
        grads = grads_or_zeros(grads, params, what="the loss returned by `training_step`", wrt="parameters")
        world = ctx.world_size
        if self.scope == "global" and world > 1:
            if double:  # a differentiable mean over the ranks (the strategy's all_gather with sync_grads)
                grads = ctx.mean_over_ranks(grads)
            else:  # no graph needed: one flat all-reduce (of a copy: the linearised loss keeps the local ∇L)
                grads = ctx.average_over_ranks(grads)
        penalty = squared_norm_sum(grads)
        if double:
            objective = objective.add(weight * penalty)
        else:
            objective = objective.add(weight * penalty.detach())
            rel = self.step if self.step is not None else default_step("parameter", ctx.compute_dtype(params[0]))
            # (2/h)·[L(θ + h g) − L(θ)] at θ + h·g in place, with the primary pass's dropout masks; its −L(θ) part
            # through the linearised loss (gradient: the local ∇L). ctx.extra_loss puts the module's state back.
            h = parameter_step_size(params, penalty.detach().sqrt(), rel)
            term, _ = parameter_difference(lambda: ctx.extra_loss(batch, before), params, grads,
                                           objective.linearised_loss, h=h)
            objective = objective.add(weight * term)
        self.check_and_log(ctx, self.log_name, penalty)
        self.applied += 1
        return objective

    def trial_penalty(self, ctx: StepContext, batch: Any) -> torch.Tensor:
        loss = ctx.extra_loss(batch, "fork")
        params = ctx.trainable_parameters()
        grads = autograd_grad(loss, params, create_graph=True, retain_graph=True, allow_unused=True)
        return squared_norm_sum([g for g in grads if g is not None])
