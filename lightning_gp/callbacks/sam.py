"""SharpnessAwareMinimization: the optimizer sees ∇θL(θ + ε), ε = ρ·g/‖g‖ (SAM) or ρ·θ²⊙g/‖θ⊙g‖ (ASAM)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_gp._lightning.private import compiled_modules
from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks.flooding import Flooding
from lightning_gp.callbacks.parameter_penalty import LOCAL_SCOPE_SHARDED, SCOPES, Scope
from lightning_gp.functional._autograd import Displacement
from lightning_gp.functional._checks import check_bool, check_choice, check_number, grads_or_zeros
from lightning_gp.functional._rng import RNGState
from lightning_gp.functional.penalties import displaced_linearisation, displaced_loss, parameter_difference
from lightning_gp.functional.sharpness import sam_perturbation
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective


class SharpnessAwareMinimization(PenaltyCallback):
    r"""Sharpness-aware minimization on an unchanged LightningModule: the optimizer steps on ∇θL(θ + ε).

    g = ∇θL over all trainable parameters together; ε = ρ·g/‖g‖ (SAM) or, with ``adaptive``, ρ·θ²⊙g/‖θ⊙g‖ (ASAM).
    The clean pass gives g, a second pass at θ + ε (dropout masks replayed, BatchNorm statistics left alone) the
    gradient, through Lightning's backward; θ is back bit for bit by the module's ``on_after_backward`` (θ + ε in new
    storage where a parameter fills its own alone, else in place). Each accumulated micro-batch takes its own ε; under
    AMP ε comes from the unscaled gradient. Logs ``sharpness/sam_gap``. [Guide](../sharpness.md).

    Args:
        rho: the radius ρ ≥ 0 (0.05 is SAM's usual value; ASAM takes larger ones, 0.5 to 2).
        adaptive: ASAM's scale-invariant step.
        scope: ``"local"``: each DDP rank's ε from its own gradient (SAM's reference); ``"global"``: from the mean.
        every_n_steps: SAM on every k-th optimizer step; plain steps in between.
        check_finite: check each step's loss, gap and gradients before the update.

    Raises:
        ValueError, TypeError: a negative or non-finite ``rho``, an unknown ``scope``; ``Flooding`` beside it.
        FloatingPointError: a step whose loss, gap or gradients are NaN/Inf.

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> w = torch.nn.Linear(2, 1, bias=False)
        >>> loss_fn = lambda b: (w(b) ** 2).mean()
        >>> x = torch.randn(4, 2)
        >>> total = penalized_loss(w, loss_fn, x, [SharpnessAwareMinimization(rho=0.1)])
        >>> (g,) = torch.autograd.grad(loss_fn(x), [w.weight])
        >>> with torch.no_grad():
        ...     w.weight += 0.1 * g / g.norm()  # θ + ε
        >>> (g_sam,) = torch.autograd.grad(loss_fn(x), [w.weight])
        >>> with torch.no_grad():
        ...     w.weight -= 0.1 * g / g.norm()
        >>> (got,) = torch.autograd.grad(total, [w.weight])
        >>> torch.allclose(got, g_sam)
        True
    """

    order = ORDER["SharpnessAwareMinimization"]  # its place in the chain: _chain.ORDER
    log_name = "sharpness/sam_gap"

    def __init__(
        self,
        rho: float = 0.05,
        *,
        adaptive: bool = False,
        scope: Scope = "local",
        every_n_steps: int = 1,
        check_finite: bool = True,
    ) -> None:
        super().__init__(1.0, every_n_steps, check_finite)
        owner = type(self).__name__
        self.rho = check_number(rho, "rho", owner, fix="SAM's radius, e.g. rho=0.05 (SAM) or 0.5 to 2 (ASAM).")
        self.adaptive = check_bool(adaptive, "adaptive", owner)
        self.scope = check_choice(scope, "scope", SCOPES, owner)
        self._displacement: Displacement | None = None  # θ + ε held for Lightning's backward (see `apply`)
        self._hold_for_backward = False  # decided in `setup` from the callbacks before this one
        self._compiled = False  # compiled modules keep θ in place (CUDA graphs assume fixed parameter addresses)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and any(isinstance(cb, Flooding) for cb in trainer.callbacks):
            raise ValueError(
                f"{type(self).__name__} and Flooding in one Trainer: Flooding flips the sign of the loss below its "
                f"level, and SAM's step is taken on the loss itself, so their gradients would not combine into "
                f"either method. Use one of them."
            )
        super().setup(trainer, pl_module, stage)
        # θ + ε held for Lightning's backward comes back in this callback's `on_after_backward`, which Lightning calls
        # before the module's. A callback listed before this one with its own `on_after_backward` would see θ + ε
        # there: then the perturbed pass's gradient is taken inside `apply` instead, θ back before it returns.
        preceding = trainer.callbacks[: trainer.callbacks.index(self)] if self in trainer.callbacks else []
        self._hold_for_backward = not any(type(cb).on_after_backward is not Callback.on_after_backward
                                          for cb in preceding)
        self._compiled = bool(compiled_modules(pl_module))

    def unsupported_when_sharded(self) -> str | None:
        return LOCAL_SCOPE_SHARDED if self.scope == "local" else None

    def _release(self) -> None:
        """θ back from a displacement held for Lightning's backward (a no-op when none is held or it is back)."""
        displacement, self._displacement = self._displacement, None
        if displacement is not None:
            displacement.restore()

    @override
    def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
        self._release()

    @override
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._release()  # never step from θ + ε, even if no backward came
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._release()

    @override
    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._release()
        super().on_exception(trainer, pl_module, exception)

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._release()
        super().teardown(trainer, pl_module, stage)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        self._release()  # a previous micro-batch's displacement whose backward never came
        if ctx.global_step % self.every_n_steps != 0 or self.rho == 0:
            return inner(batch)
        params = self.trainable_parameters(ctx, "so there is nothing to perturb")
        before = RNGState.capture(params[0].device)  # the clean pass's dropout masks, replayed at θ + ε
        objective = inner(batch)
        loss = self.loss_with_graph(objective)
        alone = ctx.members == [self]  # nothing else in the chain reads the clean gradient or the loss's graph
        # Lightning's backward differentiates the perturbed pass itself, as the second backward of a hand-written
        # loop: θ stays at θ + ε until that backward is over and comes back bit for bit in `on_after_backward` (the
        # other hooks above release it at the latest). The clean pass then needs g only, w.r.t. the parameters.
        held = alone and ctx.lightning_backward and ctx.sharding is None and self._hold_for_backward
        if held:
            found = torch.autograd.grad(loss, params, allow_unused=True)
        else:
            # ∇L for every leaf of the loss in one backward; the loss is linearised (`Objective.loss_grads`), so the
            # final backward runs through the perturbed pass's graph only, as a hand-written two-pass loop does.
            objective = objective.loss_grads(retain=ctx.loss_graph_needed_outside(self))
            found = [objective.grad_of(p) for p in params]
        grads = grads_or_zeros(found, params, what="the loss returned by `training_step`", wrt="parameters")
        if self.scope == "global":  # one flat all-reduce of a copy (the linearised loss keeps the local g)
            grads = ctx.average_over_ranks(grads)
        direction, h = sam_perturbation(params, grads, rho=self.rho, adaptive=self.adaptive)
        del found, grads  # `direction` is the last reference to g: `displaced_loss` lets it go once θ has moved
        loss_at = lambda: ctx.extra_loss(batch, before)  # noqa: E731  (the clean pass's dropout masks; state put back)
        if held or (alone and h != 0 and math.isfinite(h)):
            # The objective is L(θ + ε), with L(θ)'s value (a zero or non-finite g displaces by 0 or NaN: the
            # gradient is then g itself, or NaN for the finiteness check).
            if held:
                at, self._displacement = displaced_loss(loss_at, params, direction, h=h,
                                                        owner=None if self._compiled else ctx.module)
            else:  # the perturbed gradient taken now, handed over by the final backward in one multiply
                at = displaced_linearisation(loss_at, params, direction, h=h)
            perturbed = at.detach()
            objective = replace(objective, linearised_loss=at - perturbed + loss.detach())
        else:
            # (h/h)·[∇L(θ + h·d) − ∇L(θ)] added to the clean gradient: the objective's gradient is ∇L(θ + ε), its
            # value still L(θ), and the members outside see the clean ∇L(θ) in `step.grads`.
            term, perturbed = parameter_difference(loss_at, params, direction, objective.linearised_loss, h=h, scale=h)
            objective = objective.add(term)
        self.check_and_log(ctx, self.log_name, perturbed - loss.detach())
        self.applied += 1
        return objective
