"""``method="auto"``: double backward where the model has one, finite differences where it has none.

Decided once, at the first penalized step, before the chain runs (:meth:`MethodChoice.prepare`): the penalty's
double backward is tried on a trial extra pass of that step's batch, its result thrown away; inside the chain every
member's method is then known. SDPA attention (the default of most Hugging Face model classes),
torch.compile'd modules and custom autograd Functions have no double backward; with ``"auto"`` they train by
finite differences instead of failing inside Lightning's backward. The choice shows in the ``repr`` and in
``lightning_gp``'s log; under DDP every rank takes finite differences if any rank lacks a double backward.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from torch import Tensor

from lightning_gp._lightning.arguments import with_resolved
from lightning_gp.functional._autograd import (
    METHODS,
    Method,
    NoDoubleBackwardError,
    agreed_method,
    supports_double_backward,
)
from lightning_gp.functional._checks import check_choice
from lightning_gp.step._batch import first_samples
from lightning_gp.step._chain import SkipBatch

__all__ = ["METHODS", "Method", "MethodChoice"]

#: How many samples the trial of ``method="auto"`` runs on (two: BatchNorm in training mode refuses one).
TRIAL_SAMPLES = 2

log = logging.getLogger("lightning_gp")


class MethodChoice:
    """Mixin of the callbacks with a ``method``: :attr:`resolved_method` and the first step's decision."""

    method: str
    _resolved: str | None

    def init_method(self, method: str) -> None:
        """Check and set ``method`` (called from the callback's ``__init__``); "auto" starts undecided."""
        self.method = check_choice(method, "method", METHODS, type(self).__name__)
        self._resolved = None  # what "auto" chose, at the first penalized step

    @property
    def needs_loss_graph(self) -> bool:
        """A double backward differentiates the loss's graph (while undecided, "auto" may)."""
        return self.resolved_method != "finite_difference"

    @property
    def resolved_method(self) -> str | None:
        """``method``, or what ``"auto"`` chose (None until the first penalized step)."""
        if self.method != "auto":
            return self.method
        return self._resolved

    def resolve_method(self, method: str, why: str) -> None:
        """Fix what ``"auto"`` stands for from now on (no-op for an explicit ``method``)."""
        if self.method == "auto" and self._resolved is None:
            self._resolved = method
            log.info("%s(method='auto') uses %r: %s", type(self).__name__, method, why)

    def trial_penalty(self, ctx: Any, batch: Any) -> Tensor:
        """The double-backward penalty on ``batch``, built on an extra pass (the trial of :meth:`prepare`)."""
        raise NotImplementedError

    def prepare(self, ctx: Any, batch: Any) -> None:
        """Before the chain runs: decide what ``"auto"`` stands for, once, on a trial extra pass (a forked random
        stream, the module put back, the result thrown away) of the batch's first :data:`TRIAL_SAMPLES` samples:
        whether the model has a double backward does not depend on the batch size, and the trial then costs a
        small part of the step it precedes. The whole batch where the step cannot run on a part of it. Every
        member's ``method`` is then known inside the chain; skipped on a step the member does not apply."""
        if self.resolved_method is not None or self.active_weight(ctx) == 0:
            return
        params = ctx.trainable_parameters()
        part = first_samples(batch, TRIAL_SAMPLES)
        for trial in ([part] if part is not None else []) + [batch]:
            try:
                self.decide_method(ctx, lambda b=trial: self.trial_penalty(ctx, b), params)
                return
            except SkipBatch:  # the step skips this (part of the) batch: nothing to try it on, decide later
                return
            except (RuntimeError, ValueError, IndexError, TypeError):
                if trial is batch:
                    raise

    def decide_method(self, ctx: Any, build: Callable[[], Tensor], inputs: list[Tensor]) -> None:
        """For ``"auto"`` still undecided: build the double-backward penalty, try differentiating it, and fix the
        method where every rank agrees (left undecided where the penalty had no graph to try)."""
        try:
            works = supports_double_backward(build(), inputs)
        except NoDoubleBackwardError:
            works = False
        method, settled = agreed_method(works, lambda t: ctx.reduce(t, "max"), inputs[0].device if inputs else None)
        if method == "finite_difference":  # any rank without a double backward: all ranks difference
            self.resolve_method(method, "this model has no double backward (SDPA attention, torch.compile or a "
                                "custom autograd Function); two ordinary passes instead")
        elif settled:
            self.resolve_method(method, "the model has a double backward")

    def unsupported_when_sharded(self) -> str | None:
        """Under FSDP2 a penalty with a ``method`` runs by finite differences; its double backward cannot."""
        if self.method == "double_backward":
            return ("method='double_backward' differentiates a gradient, and FSDP2's backward frees the all-gathered "
                    "parameters a second differentiation needs (use method='finite_difference' or 'auto')")
        return None

    def __repr__(self) -> str:
        return with_resolved(super().__repr__(), self.method, self.resolved_method)
