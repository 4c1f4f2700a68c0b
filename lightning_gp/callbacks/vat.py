"""VirtualAdversarialTraining: a label-free smoothness term, KL(p(·|x) ‖ p(·|x + r_vadv))."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks._logits import LogitsFn, batch_logits, check_logits_source
from lightning_gp.functional._checks import check_number, check_positive_int
from lightning_gp.functional.vat import kl_divergence, virtual_adversarial_direction
from lightning_gp.step._batch import InputKey
from lightning_gp.step._chain import ORDER, StepContext, extra_pass
from lightning_gp.step._objective import Objective
from lightning_gp.step._site import Probe, Site, SiteCallback, Target


class VirtualAdversarialTraining(SiteCallback, PenaltyCallback):
    r"""Adds ``weight · KL(p(·|x) ‖ p(·|x + r_vadv))`` (Miyato et al. 2018); needs no labels.

    r_vadv = ε·d/‖d‖ per sample, d found by ``power_iterations`` of d ← ∇_r KL(p ‖ p(·|x + ξd)) from a random
    unit direction; p(·|x) is detached. On the batch input, or with ``target`` on a layer's output (the
    embeddings of a token model). Logs ``penalty/vat`` (the KL, unweighted). The random directions come from
    :meth:`step_generator`, so a resumed run draws what the uninterrupted one drew.

    Args:
        epsilon: radius ε > 0 of r_vadv, per sample, in the l2 norm over all non-batch dims.
        xi: the small step ξ > 0 of the power iteration; None: ε^(1/3)·‖xᵢ‖ per sample, ε the unit roundoff of
            the dtype the pass computes in (:func:`lightning_gp.functional.vat.virtual_adversarial_xi`).
        power_iterations: ≥ 1.
        weight: α ≥ 0.
        target: perturb this layer's output (dotted path or module) instead of the batch input.
        input_key: the input in the batch (see :class:`DataGradientPenalty`).
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        logits_fn: ``(pl_module, batch) -> logits``; default ``pl_module(input)``.
        check_finite: check each step's loss, KL and gradients before the update (one host read a step).

    Raises:
        ValueError: a bad argument, or logits that are not (B, C).
        TypeError: an integer input without ``target``.
        NotImplementedError: at setup, no ``logits_fn`` and a module without ``forward``.
        FloatingPointError: a step whose loss, KL or gradients are NaN/Inf (see `DataGradientPenalty`).

    Example:


        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(3, 4)
        >>> x = torch.randn(8, 3)
        >>> vat = VirtualAdversarialTraining(1.0, logits_fn=lambda module, batch: module(batch))
        >>> total = penalized_loss(net, lambda b: torch.zeros(()), x, [vat])  # unlabeled: no supervised loss
        >>> bool(total > 0)
        True
    """

    order = ORDER["VirtualAdversarialTraining"]  # its place in the chain: _chain.ORDER
    log_name = "penalty/vat"

    def __init__(
        self,
        epsilon: float,
        *,
        xi: float | None = None,
        power_iterations: int = 1,
        weight: float = 1.0,
        target: Target = None,
        input_key: InputKey = None,
        mask_key: str | None = None,
        logits_fn: LogitsFn | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(weight, check_finite=check_finite)
        self.epsilon = check_number(epsilon, "epsilon", type(self).__name__, strict=True)
        self.xi = None if xi is None else check_number(xi, "xi", type(self).__name__, strict=True)
        self.power_iterations = check_positive_int(power_iterations, "power_iterations", type(self).__name__)
        check_logits_source(None, logits_fn, type(self).__name__)
        self.input_key, self.target, self.mask_key, self.logits_fn = input_key, target, mask_key, logits_fn
        self.site = Site(target, input_key, mask_key, type(self).__name__)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            check_logits_source(pl_module, self.logits_fn, type(self).__name__)

    def _logits(self, ctx: StepContext, probe: Probe, batch: Any) -> Tensor:
        """The logits of ``batch`` (an extra pass: no logging, BatchNorm statistics left alone)."""
        with extra_pass(ctx.module):
            return batch_logits(ctx.module, probe, batch, self.logits_fn, self.input_key, type(self).__name__)

    def unsupported_when_sharded(self) -> str | None:
        return None  # input-space passes: every rank runs the whole (all-gathered) model on its own samples

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        objective = inner(batch)
        weight = self.active_weight(ctx)
        if weight == 0:
            return objective
        probe = self.site.probe(ctx.module, batch)
        with torch.no_grad():  # p(·|x), detached
            clean, _ = probe.run(lambda b: self._logits(ctx, probe, b), lambda like: like.new_zeros(like.shape))

        def kl_at(r: Tensor) -> Tensor:
            return probe.run(lambda b: kl_divergence(clean, self._logits(ctx, probe, b)), r)[0]

        d = virtual_adversarial_direction(
            kl_at, probe.base, xi=self.xi, power_iterations=self.power_iterations, masked=probe.masked,
            generator=self.step_generator(ctx), owner=type(self).__name__,
            what="target output" if self.target is not None else "input", dtype=ctx.compute_dtype(probe.base),
        )
        vat = kl_at(self.epsilon * d)
        self.check_and_log(ctx, self.log_name, vat, batch_size=clean.shape[0])
        self.applied += 1
        return objective.add(weight * vat)

