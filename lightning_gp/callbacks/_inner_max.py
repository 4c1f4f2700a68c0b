"""What TRADES and MART share: ε, β, the inner maximisation's settings, the logits, and the callbacks they exclude."""

from __future__ import annotations

import contextlib
from typing import Any

from torch import Tensor

from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks._logits import LogitsFn, batch_logits, check_logits_source
from lightning_gp.functional._checks import check_choice, check_clamp, check_number, check_positive_int
from lightning_gp.functional._state import module_mode
from lightning_gp.functional.adversarial import NORMS, Norm
from lightning_gp.functional.trades import ATTACK_MODES, AttackMode
from lightning_gp.step._chain import StepContext, extra_pass
from lightning_gp.step._site import Probe


class InnerMaxCallback(PenaltyCallback):
    """Base of the callbacks that find x' by TRADES's inner maximisation and weigh a term by β (the weight)."""

    #: the callbacks it cannot share a Trainer with, what it does, and what they do that conflicts
    exclusive: tuple[str, ...] = ()
    what_it_does = ""
    what_they_do = ""

    def __init__(self, eps: float, beta: float, *, norm: Norm, steps: int, step_size: float | None,
                 bounds: tuple[float, float] | None, logits_fn: LogitsFn | None, attack_mode: AttackMode,
                 check_finite: bool) -> None:
        owner = type(self).__name__
        super().__init__(beta, check_finite=check_finite)
        self.beta = self.weight
        self.eps = check_number(eps, "eps", owner)
        self.norm = check_choice(norm, "norm", NORMS, owner)
        self.steps = check_positive_int(steps, "steps", owner)
        self.step_size = None if step_size is None else check_number(step_size, "step_size", owner)
        self.bounds = check_clamp(bounds)
        self.attack_mode = check_choice(attack_mode, "attack_mode", ATTACK_MODES, owner)
        self.logits_fn = logits_fn
        check_logits_source(None, logits_fn, owner)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        others = [type(cb).__name__ for cb in trainer.callbacks if type(cb).__name__ in self.exclusive]
        if others:
            raise ValueError(f"{type(self).__name__} {self.what_it_does}, and {others[0]} {self.what_they_do}: use "
                             f"one of the two.")
        check_logits_source(pl_module, self.logits_fn, type(self).__name__)

    def unsupported_when_sharded(self) -> str | None:
        return None  # input-space passes: every rank runs the whole (all-gathered) model on its own samples

    def _attack_pass(self, ctx: StepContext) -> contextlib.AbstractContextManager[None]:
        """Where x' is found: the module in ``attack_mode``, no trace left on it (no log, its state put back)."""
        stack = contextlib.ExitStack()
        stack.enter_context(extra_pass(ctx.module))
        stack.enter_context(module_mode(ctx.module, self.attack_mode == "train"))
        return stack

    def _logits(self, ctx: StepContext, probe: Probe, batch: Any) -> Tensor:
        return batch_logits(ctx.module, probe, batch, self.logits_fn, getattr(self, "input_key", None),
                            type(self).__name__)
