"""GradAlign: weight · (1 − mean_i cos(∇ₓℓᵢ(x), ∇ₓℓᵢ(x + ηᵢ))) added to the loss (Andriushchenko & Flammarion 2020)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks._method import Method, MethodChoice
from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._autograd import leaf_gradients, linearised
from lightning_gp.functional._checks import check_choice, check_number
from lightning_gp.functional._rng import RNGState
from lightning_gp.functional.adversarial import Norm
from lightning_gp.functional.grad_align import misalignment, uniform_noise
from lightning_gp.functional.penalties import input_difference, input_step_from_statistics, input_step_statistics
from lightning_gp.functional.precision import default_step
from lightning_gp.step._batch import InputKey
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective
from lightning_gp.step._site import Probe, Site, SiteCallback, Target


class GradAlign(MethodChoice, SiteCallback, PenaltyCallback):
    r"""Adds ``weight · (1 − mean_i cos(∇ₓℓᵢ(x), ∇ₓℓᵢ(x + ηᵢ)))``, η ~ U[−ε, ε] (Andriushchenko & Flammarion 2020).

    Beside FGSM training (``AdversarialTraining(eps, norm="linf")``) it prevents catastrophic overfitting. As in the
    authors' code: both gradients are of the loss ``training_step`` returns, on the clean batch (GradAlign sits outside
    adversarial training in the chain); the first is detached, the second differentiated (a double backward, or a
    finite difference where the model has none); η is not clipped to the input's box; the mean runs over the samples
    whose two gradients are nonzero. Logs ``penalty/grad_align`` (1 − mean cos, unweighted).

    Args:
        weight: λ ≥ 0 (the authors' 0.2 for FGSM at ε = 8/255 on CIFAR-10).
        eps: half-width ε of η (the attack's radius).
        norm: the threat model; "linf" (the authors' uniform noise in the l∞ box) is the one defined.
        input_key: the input in the batch (see :class:`DataGradientPenalty`).
        target: use this layer's output (a transformer's embeddings) instead of the batch input.
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        every_n_steps: lazy regularization: the penalty on every k-th optimizer step with weight × k.
        method: "double_backward", "finite_difference" (two ordinary passes) or "auto" (decided at the first step).
        step: relative input displacement of the finite difference; None: the compute dtype's default.
        check_finite: check each step's loss, penalty and gradients before the update.

    Raises:
        ValueError: a bad argument; a loss that does not depend on the input.

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> ce = lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1])
        >>> bool(penalized_loss(net, ce, (x, y), [GradAlign(0.2, 8 / 255)]) >= ce((x, y)))
        True
    """

    order = ORDER["GradAlign"]  # its place in the chain: _chain.ORDER (outside adversarial training)
    log_name = "penalty/grad_align"

    def __init__(
        self,
        weight: float,
        eps: float,
        *,
        norm: Norm = "linf",
        input_key: InputKey = None,
        target: Target = None,
        mask_key: str | None = None,
        every_n_steps: int = 1,
        method: Method = "auto",
        step: float | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(weight, every_n_steps, check_finite)
        owner = type(self).__name__
        self.eps = check_number(eps, "eps", owner, strict=True,
                                fix="GradAlign compares the gradient at x with one at a random point of the ε-ball.")
        self.norm = check_choice(norm, "norm", ("linf",), owner)
        self.input_key, self.target, self.mask_key = input_key, target, mask_key
        self.site = Site(target, input_key, mask_key, owner)
        self.init_method(method)
        self.step = None if step is None else check_number(step, "step", owner, strict=True)

    def unsupported_when_sharded(self) -> str | None:
        return MethodChoice.unsupported_when_sharded(self)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        weight = self.active_weight(ctx)
        if weight == 0:
            return inner(batch)
        ctx.clean_input_gradients = {}  # FGSM from x inside records ∇ₓL at x there (the first gradient, taken once)
        objective = inner(batch)
        probe = self.site.probe(ctx.module, batch)
        g1 = self._first_gradient(ctx, probe)
        eta = probe.masked(uniform_noise(probe.base.detach(), self.eps, self.step_generator(ctx)))
        method = self.resolved_method or "double_backward"
        if method == "double_backward":
            loss, leaf = probe.run(ctx.extra_loss, eta.clone().requires_grad_(True))
            g2 = self.site.input_gradient(autograd_grad(loss, leaf, create_graph=True, allow_unused=True)[0])
            penalty = misalignment(g1, g2)
            objective = objective.add(weight * penalty)
        else:
            penalty, term = self._difference(ctx, probe, g1, eta)
            objective = objective.add(weight * (penalty + term))
        self.check_and_log(ctx, self.log_name, penalty.detach(), batch_size=probe.base.shape[0])
        self.applied += 1
        return objective

    def _first_gradient(self, ctx: StepContext, probe: Probe) -> Tensor:
        """∇ₓL at the clean input (or target output), detached: the one FGSM from x took already (as the authors reuse
        it), else an extra pass and its backward to the input only."""
        if probe.module is None and probe.mask is None and ctx.clean_input_gradients is not None:
            taken = ctx.clean_input_gradients.get(id(probe.x))
            if taken is not None:
                return taken
        loss, leaf = probe.run(ctx.extra_loss)
        return self.site.input_gradient(autograd_grad(loss, leaf, allow_unused=True)[0]).detach()

    def _difference(self, ctx: StepContext, probe: Probe, g1: Tensor, eta: Tensor) -> tuple[Tensor, Tensor]:
        """(the penalty, a term of value 0 whose parameter gradient is ≈ the penalty's): with v = ∂P/∂g₂ held fixed,
        ∇θ P = ∇θ⟨v, ∇ₓL(x + η)⟩ ≈ [∇θ L(x + η + h·v) − ∇θ L(x + η)] / h."""
        device = eta.device
        before = RNGState.capture(device)  # the second pass at x + η + h·v replays this one's dropout masks
        loss, leaf = probe.run(ctx.extra_loss, eta.clone().requires_grad_(True))
        pairs = leaf_gradients(loss)
        g2 = self.site.input_gradient(next((g for v, g in pairs if v is leaf), None)).detach().requires_grad_(True)
        with torch.enable_grad():
            penalty = misalignment(g1, g2)
            (v,) = torch.autograd.grad(penalty, g2)
        base = linearised(loss, [(p, g) for p, g in pairs if p is not leaf])
        x = probe.masked(probe.base.detach())
        rel_step = self.step if self.step is not None else default_step("input", ctx.compute_dtype(probe.base))
        h = input_step_from_statistics(ctx.gather(input_step_statistics(x, v)), rel_step)
        term = input_difference(lambda delta: probe.run(lambda b: ctx.extra_loss(b, before), eta + delta)[0],
                                h * v.to(x.dtype), base, h=h)
        return penalty.detach(), term

    def trial_penalty(self, ctx: StepContext, batch: Any) -> Tensor:
        probe = self.site.probe(ctx.module, batch)
        loss, leaf = probe.run(lambda b: ctx.extra_loss(b, "fork"))
        g = autograd_grad(loss, leaf, create_graph=True, allow_unused=True)[0]
        return misalignment(self.site.input_gradient(g).detach(), self.site.input_gradient(g))
