"""AdversarialTraining: train on FGSM/PGD examples of an unchanged module's own loss."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.functional import fgsm, pgd
from lightning_gp.functional._checks import check_bool, check_choice, check_clamp, check_number, check_positive_int
from lightning_gp.functional.adversarial import NORMS, Norm, Radius, default_step_size, pgd_step, random_start
from lightning_gp.functional.gradients import per_sample_norm
from lightning_gp.functional.layer_output import expand_mask
from lightning_gp.step._batch import InputKey, replace_input
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective
from lightning_gp.step._site import Probe, Site, SiteCallback, Target

#: After how many steps a flat adversarial loss is warned about (once), and from which ε (as a share of the
#: perturbed tensor's median per-sample norm) on.
STALL_STEPS, LARGE_SHARE = 100, 0.05


class AdversarialTraining(SiteCallback, PenaltyCallback):
    r"""Trains on ``(1 − a)·L(x) + a·L(x_adv)``, x_adv an FGSM (``steps=1``) or PGD attack on the module's loss.

    ``norm="l2"`` steps along gᵢ/‖gᵢ‖, ``norm="linf"`` by sign (torchattacks' FGSM/PGD). Logs ``adversarial/loss``
    (and ``adversarial/clean_loss``). With ``target`` δ is added to a layer's output (FGM/PGD on embeddings), per
    sample, padding never perturbed. Warns once where ε looks too large to learn. Design:
    [Changing the loss](../design/loss-changing-callbacks.md).

    Args:
        epsilon: radius ε ≥ 0 of the perturbation ball.
        norm: ``"l2"`` or ``"linf"``.
        steps: 1 for FGSM, more for PGD.
        step_size: default ε for FGSM (1.25·ε with ``random_start``), 2.5·ε/steps for PGD.
        random_start: start from a uniform point in the ε-ball.
        clamp: ``(lo, hi)`` valid input range, e.g. ``(0, 1)`` for images (inputs outside it are refused).
        adversarial_weight: a ∈ [0, 1].
        average_steps: FreeLB (Zhu et al. 2020): train on the mean loss over the ``steps`` ascent points
            δ₀ … δ_{K−1}, one objective and one backward (needs ``adversarial_weight=1``).
        input_key: which part of the batch is the input (see `DataGradientPenalty`).
        target: perturb this layer's output (dotted path or module) instead of the batch input.
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        eps_relative: ε and ``step_size`` as shares of each sample's own norm (l2 or l∞, real positions only).
        check_finite: see `DataGradientPenalty`.

    Raises:
        ValueError, TypeError: a bad argument or input; FloatingPointError: a NaN/Inf step (see `DataGradientPenalty`).

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> mse = lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1])
        >>> adversarial = penalized_loss(net, mse, (x, y), [AdversarialTraining(0.5)])
        >>> bool(adversarial > mse((x, y)))  # the loss at the FGSM point is higher
        True
    """

    order = ORDER["AdversarialTraining"]  # its place in the chain: _chain.ORDER
    needs_loss_graph = True  # FreeLB and a clean first pass differentiate the primary loss after the chain

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
        average_steps: bool = False,
        input_key: InputKey = None,
        target: Target = None,
        mask_key: str | None = None,
        eps_relative: bool = False,
        check_finite: bool = True,
    ) -> None:
        super().__init__(1.0, check_finite=check_finite)
        owner = type(self).__name__
        self.epsilon = check_number(epsilon, "epsilon", owner)
        self.norm = check_choice(norm, "norm", NORMS, owner)
        self.steps = check_positive_int(steps, "steps", owner)
        self.step_size = None if step_size is None else check_number(
            step_size, "step_size", owner, strict=self.epsilon > 0,
            fix="A zero step never moves the input, so training would be on the clean batch; leave "
                "`step_size=None` for the default (ε for FGSM, 2.5·ε/steps for PGD).")
        self.random_start = check_bool(random_start, "random_start", owner)
        self.clamp = check_clamp(clamp)
        try:
            a = check_number(adversarial_weight, "adversarial_weight", owner, high=1)
        except ValueError:  # a share of the objective: say its interval
            raise ValueError(f"{owner}(adversarial_weight={adversarial_weight!r}): `adversarial_weight` must be in "
                             f"[0, 1], got {adversarial_weight!r}.") from None
        if average_steps and a != 1:
            raise ValueError(
                f"`average_steps=True` (FreeLB) trains on the mean loss over the {steps} ascent steps, so it takes "
                f"no `adversarial_weight`; got {adversarial_weight!r}. Leave it at 1 (with `random_start=False` "
                f"the first of the averaged losses is the clean one)."
            )
        if target is not None and clamp is not None:
            raise ValueError(f"`clamp={clamp!r}` bounds a batch input; a layer's output (`target={target!r}`) "
                             f"has no valid range. Drop `clamp`.")
        self.adversarial_weight = a
        self.average_steps = check_bool(average_steps, "average_steps", owner)
        self.eps_relative = check_bool(eps_relative, "eps_relative", owner)
        self.input_key, self.target, self.mask_key = input_key, target, mask_key
        self.site = Site(target, input_key, mask_key, owner)
        self._losses: list[float] = []  # the adversarial loss of the first STALL_STEPS steps (`_watch_learning`)
        self._median_norm: float | None = None
        self._stall_checked = False

    @property
    def announces_objective(self) -> bool:
        """Whether the step tells the weight perturbers (AWP) its objective: on the batch input's FGSM/PGD path."""
        return self.target is None and not self.average_steps and not self.eps_relative

    @property
    def resolved_step_size(self) -> float:
        """The step length used: ``step_size``, or its default for ``steps`` and ``random_start``."""
        if self.step_size is not None:
            return self.step_size
        return default_step_size(self.epsilon, self.steps, self.random_start)

    def attack(self, ctx: StepContext, batch: Any, x: Tensor, path: tuple,
               origin: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """The adversarial input, and the clean loss if the attack happened to compute it (batch input); the clean
        input gradient goes to ``ctx.clean_input_gradients`` under ``id(origin)`` (the batch's own input tensor)."""
        clean: list[Tensor] = []

        def loss_fn(inputs: Tensor) -> Tensor:
            loss = ctx.extra_loss(replace_input(batch, path, inputs))
            if not clean and not self.random_start and torch.equal(inputs, x):
                clean.append(loss.detach())
                wanted = ctx.clean_input_gradients
                if wanted is not None and origin is not None and inputs.requires_grad:  # GradAlign's first gradient
                    inputs.register_hook(lambda g: wanted.__setitem__(id(origin), g.detach()))
            return loss

        generator = self.step_generator(ctx) if self.random_start else None
        common = dict(epsilon=self.epsilon, norm=self.norm, random_start=self.random_start, clamp=self.clamp,
                      generator=generator)
        if self.steps == 1:
            x_adv = fgsm(loss_fn, x, step_size=self.step_size, **common)
        else:
            step_size = self.resolved_step_size
            x_adv = pgd(loss_fn, x, steps=self.steps, step_size=step_size, **common) if step_size > 0 else x
        return x_adv.to(x.dtype), (clean[0] if clean else None)

    def unsupported_when_sharded(self) -> str | None:
        return None  # input-space passes: every rank runs the whole (all-gathered) model on its own samples

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        a = self.adversarial_weight
        if a == 0:
            return inner(batch)
        probe = self.site.probe(ctx.module, batch)
        if probe.module is not None or self.average_steps or self.eps_relative:
            result, adv_loss, clean_loss = self._apply_in_delta(ctx, probe, inner)
        else:
            result, adv_loss, clean_loss = self._apply_on_input(ctx, probe, inner)
        n = probe.base.shape[0]
        self.record(ctx, "adversarial/loss", adv_loss, n)
        self._watch_learning(probe, adv_loss)
        if clean_loss is not None:
            self.record(ctx, "adversarial/clean_loss", clean_loss, n)
        self.applied += 1
        return result

    def _apply_on_input(self, ctx: StepContext, probe: Probe, inner: Callable[[Any], Objective]) -> tuple:
        """A batch input: FGSM/PGD of :mod:`lightning_gp.functional` (equal to torchattacks), then train."""
        a, batch, x = self.adversarial_weight, probe.batch, probe.x
        x_adv, clean_loss = self.attack(ctx, batch, x.detach(), probe.path, origin=x)
        if x.requires_grad:  # keep the input's own graph (it was computed upstream): x + a detached step
            x_adv = x + (x_adv - x.detach())
        adv_batch = replace_input(batch, probe.path, x_adv)
        # the loss about to be trained on, at the current weights: AWP moves the weights against it first
        ctx.adversarial_objective(lambda: ctx.extra_loss(adv_batch) if a == 1 else
                                  (1 - a) * ctx.extra_loss(batch) + a * ctx.extra_loss(adv_batch))
        if a < 1:
            objective = inner(batch)  # primary: clean
            adv_loss = ctx.extra_loss(adv_batch)
            # (1 − a)·L_clean + a·L_adv, with the inner callbacks' penalties kept at full weight. `loss_in_objective`
            # has the clean loss's value and gradient (possibly without its graph, see `Objective`).
            return objective.add(a * (adv_loss - objective.loss_in_objective)), adv_loss, objective.loss
        objective = inner(adv_batch)  # primary: adversarial
        return objective, objective.loss, clean_loss

    def _apply_in_delta(self, ctx: StepContext, probe: Probe, inner: Callable[[Any], Objective]) -> tuple:
        """A perturbation δ of the input or of a layer's output: FGM/PGD, or FreeLB with ``average_steps``.

        The passes whose losses enter the objective keep their graphs (FreeLB: all K, one backward in the
        end); the first pass is the primary one when its loss is trained on (FreeLB, or a clean first pass
        with ``adversarial_weight < 1``), so a hand-written loop's pass count is matched.
        """
        a, k = self.adversarial_weight, self.steps
        generator = self.step_generator(ctx) if self.random_start else None
        radius: list = [self.epsilon, self.resolved_step_size]  # ε and α: numbers, or (B,) with eps_relative

        def start(like: Tensor) -> Tensor:
            if self.eps_relative:  # each sample's own norm, at the clean pass, sets its ε and α
                norms = self._sample_norms(probe, like)
                radius[:] = [self.epsilon * norms, self.resolved_step_size * norms]
            if not self.random_start:
                return like.detach().new_zeros(like.shape).requires_grad_(True)
            mask = None if probe.mask is None else expand_mask(probe.mask, like)
            return random_start(like.detach(), radius[0], self.norm, mask=mask,
                                generator=generator).requires_grad_(True)

        primary_first = self.average_steps or (a < 1 and not self.random_start)
        if primary_first:
            first, delta = probe.run(inner, start, chain=True)
            loss = first.loss
        else:
            first = None
            loss, delta = probe.run(ctx.extra_loss, start)
        clean_loss = None if self.random_start else loss.detach()
        losses = [loss]
        for t in range(k):
            if self.average_steps and t == k - 1:
                break  # FreeLB: the last ascent step would only move δ past the last averaged loss
            if not loss.requires_grad:
                raise ValueError(f"{type(self).__name__}: the loss of `training_step` has no autograd graph.")
            (grad,) = torch.autograd.grad(loss, delta, retain_graph=primary_first or self.average_steps,
                                          allow_unused=True)
            if grad is None:
                raise ValueError(self._no_path())
            delta = self._step(probe, delta.detach(), grad, *radius)
            if t < k - 1:
                loss, delta = probe.run(ctx.extra_loss, delta.requires_grad_(True))
                losses.append(loss)
        if self.average_steps:  # the mean of the K losses, the first with the inner callbacks' terms
            rest = sum(losses[1:]) if k > 1 else first.loss_in_objective.new_zeros(())
            result = first.add(rest / k - (1 - 1 / k) * first.loss_in_objective)
            return result, torch.stack([v.detach() for v in losses]).mean(), clean_loss
        if a == 1:
            objective, _ = probe.run(inner, delta, chain=True)  # primary: adversarial
            return objective, objective.loss, clean_loss
        if first is None:  # random start: the clean primary pass comes now
            first, _ = probe.run(inner, lambda like: like.detach().new_zeros(like.shape), chain=True)
            clean_loss = first.loss.detach()
        adv_loss, _ = probe.run(ctx.extra_loss, delta)
        return first.add(a * (adv_loss - first.loss_in_objective)), adv_loss, clean_loss

    def _watch_learning(self, probe: Probe, adv_loss: Tensor) -> None:
        """Warn once when, over the first :data:`STALL_STEPS` steps, the adversarial loss has flattened out early
        while ε is large against the tensor it perturbs: such an ε replaces the input, the loss settles at chance
        and the model learns nothing (a host read a step until then)."""
        if self._stall_checked:
            return
        if self._median_norm is None:  # the scale ε is measured against, at the first step
            self._median_norm = float(self._sample_norms(probe, probe.base).float().median())
            if not self.eps_relative and self.epsilon > self._median_norm > 0:  # larger than the sample itself
                self._stall_checked = True
                rank_zero_warn(self._scale_advice(f"ε = {self.epsilon:g} is larger than the perturbed tensor's median "
                                                  f"per-sample norm ({self._median_norm:.3g})"))
                return
        self._losses.append(float(adv_loss.detach()))
        if len(self._losses) < STALL_STEPS:
            return
        self._stall_checked = True
        quarter = STALL_STEPS // 4
        early = sum(self._losses[quarter:2 * quarter]) / quarter
        late = sum(self._losses[2 * quarter:]) / (STALL_STEPS - 2 * quarter)
        share = self.epsilon if self.eps_relative else self.epsilon / max(self._median_norm, 1e-12)
        if late >= 0.97 * early and share >= LARGE_SHARE:
            what = "of each sample's norm" if self.eps_relative else (
                f"absolute radius, {100 * share:.0f} % of the perturbed tensor's median per-sample norm "
                f"({self._median_norm:.3g})")
            rank_zero_warn(self._scale_advice(
                f"the adversarial loss has stopped falling since step {quarter} ({early:.4g} → {late:.4g} by step "
                f"{STALL_STEPS}), so training may not be learning. ε = {self.epsilon:g} is an {what}"))

    def _sample_norms(self, probe: Probe, t: Tensor) -> Tensor:
        """Each sample's norm of the perturbed tensor ``t`` in the attack's norm, over its real positions: (B,)."""
        real = probe.masked(t.detach())
        return per_sample_norm(real) if self.norm == "l2" else real.abs().flatten(1).amax(1)

    def _scale_advice(self, finding: str) -> str:
        return (f"{type(self).__name__}: {finding}: a radius of the order of the tensor's own norm replaces the "
                f"input, and the model learns nothing. Try `eps_relative=True` with ε = 0.01–0.05, or a smaller ε "
                f"(docs/callbacks.md: 'Scale ε to the embeddings').")

    def _step(self, probe: Probe, delta: Tensor, grad: Tensor, epsilon: Radius, alpha: Radius) -> Tensor:
        """One ascent step on δ, projected onto the ε-ball and, for a batch input, into ``clamp``."""
        common = dict(epsilon=epsilon, step_size=alpha, norm=self.norm)
        if self.clamp is not None and probe.x is not None:  # a batch input: clamp x + δ into its range
            x = probe.x.detach()
            return pgd_step(x + delta, grad, origin=x, clamp=self.clamp, **common) - x
        return pgd_step(delta, grad, **common)

    def _no_path(self) -> str:
        where = f"the output of `target={self.target!r}`" if self.target is not None else "the input"
        return f"{type(self).__name__}: the loss of `training_step` does not depend on {where} (no autograd path)."
