"""TRADES: the clean loss ``training_step`` returns, plus β·(1/B)·Σᵢ KL(f(xᵢ) ‖ f(x'ᵢ)) (Zhang et al. 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_gp.callbacks._inner_max import InnerMaxCallback
from lightning_gp.callbacks._logits import LogitsFn
from lightning_gp.functional.adversarial import Norm
from lightning_gp.functional.layer_output import forward_pass
from lightning_gp.functional.trades import AttackMode, trades_adversarial, trades_kl
from lightning_gp.step._batch import InputKey, replace_input
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective
from lightning_gp.step._site import Probe, Site, SiteCallback, Target
from lightning_gp.step.interception import muted_logging

#: Callbacks that train on another batch than the clean one, which TRADES's clean loss would then not be.
REPLACES_BATCH = ("AdversarialTraining", "MART")


class TRADES(SiteCallback, InnerMaxCallback):
    r"""Adds ``β·(1/B)·Σᵢ KL(f(xᵢ) ‖ f(x'ᵢ))`` to the clean loss ``training_step`` returns (Zhang et al. 2019).

    x' maximises the KL in the ε-ball by ``steps`` signed-gradient steps from x + 0.001·N(0, I), clipped to
    ``bounds`` (:func:`lightning_gp.functional.trades_adversarial`), with the model in ``attack_mode`` ("eval", as
    the authors' code). The KL's two passes then run in train mode, x' first, as the authors' loss runs them; its
    gradient flows through both distributions. Logs ``adversarial/trades_kl`` (the KL, unweighted).

    Args:
        eps: radius ε ≥ 0.
        beta: β ≥ 0 (6 in the authors' CIFAR-10 runs; 1/λ in the paper).
        norm: "linf" or "l2".
        steps: steps of the inner maximisation.
        step_size: α; None: ε/4 (l∞, the authors' 2/255 at 8/255), 2ε/steps (l2).
        bounds: the box of the batch input; None with ``target`` (a layer's output has none).
        input_key: the input in the batch (see :class:`DataGradientPenalty`).
        logits_fn: ``(pl_module, batch) -> logits``; default ``pl_module(input)``.
        attack_mode: the model's mode while x' is found: "eval" or "train".
        target: perturb this layer's output (a transformer's embeddings) instead of the batch input.
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        check_finite: check each step's loss, KL and gradients before the update.

    Raises:
        ValueError: a bad argument; beside AdversarialTraining or MART (at setup).

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> ce = lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1])
        >>> trades = TRADES(0.1, logits_fn=lambda module, batch: module(batch[0]))
        >>> bool(penalized_loss(net, ce, (x, y), [trades]) > ce((x, y)))
        True
    """

    order = ORDER["TRADES"]  # its place in the chain: _chain.ORDER
    log_name = "adversarial/trades_kl"
    exclusive = REPLACES_BATCH
    what_it_does = "adds its KL to the clean loss"
    what_they_do = "trains on another batch, so the loss would no longer be clean"

    def __init__(
        self,
        eps: float,
        beta: float = 6.0,
        *,
        norm: Norm = "linf",
        steps: int = 10,
        step_size: float | None = None,
        bounds: tuple[float, float] | None = (0.0, 1.0),
        input_key: InputKey = None,
        logits_fn: LogitsFn | None = None,
        attack_mode: AttackMode = "eval",
        target: Target = None,
        mask_key: str | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(eps, beta, norm=norm, steps=steps, step_size=step_size, bounds=bounds, logits_fn=logits_fn,
                         attack_mode=attack_mode, check_finite=check_finite)
        if target is not None and bounds is not None:
            raise ValueError(f"{type(self).__name__}: `bounds={bounds!r}` is the box of a batch input; a layer's "
                             f"output (`target={target!r}`) has none. Pass `bounds=None`.")
        self.input_key, self.target, self.mask_key = input_key, target, mask_key
        self.site = Site(target, input_key, mask_key, type(self).__name__)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        beta = self.active_weight(ctx)
        if beta == 0:
            return inner(batch)
        probe = self.site.probe(ctx.module, batch)
        # x' first, from the running statistics the step starts with (the authors find it before any train-mode pass)
        on_adversarial = self._adversarial(ctx, probe, batch)
        # TRADES's loss at the current weights: AWP moves the weights against it before the training passes
        ctx.adversarial_objective(lambda: ctx.extra_loss(batch) + beta * trades_kl(
            self._logits(ctx, probe, batch), on_adversarial(lambda b: self._logits(ctx, probe, b))))
        objective = inner(batch)  # the clean loss: the user's step (the authors' first pass, on x)
        # the KL's passes count like the authors' (BatchNorm statistics updated, the step's dropout stream), but
        # do not log: x' first, then x for the KL's target
        with muted_logging(ctx.module):
            with forward_pass():
                adv_logits = on_adversarial(lambda b: self._logits(ctx, probe, b))
            with forward_pass():
                clean_logits = self._logits(ctx, probe, batch)
        kl = trades_kl(clean_logits, adv_logits)
        self.check_and_log(ctx, self.log_name, kl, batch_size=clean_logits.shape[0])
        self.applied += 1
        return objective.add(beta * kl)

    def _adversarial(self, ctx: StepContext, probe: Probe, batch: Any) -> Callable[[Callable[[Any], Tensor]], Tensor]:
        """x' (on the input, or on the target's output), found with the module in ``attack_mode`` and no trace on
        it; returned as ``fn ↦ fn(the batch at x')``."""
        generator = self.step_generator(ctx)
        common = dict(norm=self.norm, steps=self.steps, step_size=self.step_size, generator=generator)
        with self._attack_pass(ctx):
            if probe.module is None:  # the batch input: x' itself, as the authors' loop holds it
                x_adv = trades_adversarial(lambda u: self._logits(ctx, probe, replace_input(batch, probe.path, u)),
                                           probe.x.detach(), self.eps, bounds=self.bounds, **common)
                adv_batch = replace_input(batch, probe.path, x_adv)
                return lambda fn: fn(adv_batch)
            with torch.no_grad():
                clean, _ = probe.run(lambda b: self._logits(ctx, probe, b), lambda like: like.new_zeros(like.shape))
            base = probe.base.detach()
            x_adv = trades_adversarial(lambda u: probe.run(lambda b: self._logits(ctx, probe, b), u - base)[0],
                                       base, self.eps, bounds=None, clean_logits=clean, **common)
        delta = (x_adv - base).detach()
        return lambda fn: probe.run(fn, delta)[0]
