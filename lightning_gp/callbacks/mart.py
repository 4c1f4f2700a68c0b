"""MART: misclassification-aware adversarial training (Wang et al. 2020), in place of the loss ``training_step``
returns."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gp.callbacks._inner_max import InnerMaxCallback
from lightning_gp.callbacks._logits import LogitsFn
from lightning_gp.functional.adversarial import Norm
from lightning_gp.functional.layer_output import forward_pass
from lightning_gp.functional.mart import mart_terms
from lightning_gp.functional.trades import AttackMode, gaussian_start_ascent
from lightning_gp.step._batch import InputKey, class_labels, replace_input
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective
from lightning_gp.step._site import Probe, Site
from lightning_gp.step.interception import muted_logging

#: Callbacks whose loss MART's replacement would discard, or whose batch it would not be.
EXCLUSIVE = ("AdversarialTraining", "TRADES")


class MART(InnerMaxCallback):
    r"""Trains on MART's loss instead of the one ``training_step`` returns (Wang et al. 2020).

    The loss: the boosted cross-entropy of x' (CE plus −log(1.0001 − p'ₖ), k the most probable wrong class at x'),
    plus β·(1/B)·Σᵢ KL(p(xᵢ) ‖ p(x'ᵢ))·(1.0000001 − p(xᵢ)_yᵢ): the authors' constants
    (:func:`lightning_gp.functional.mart_terms`). x' maximises the cross-entropy by ``steps`` signed steps from
    x + 0.001·N(0, I), with the model in ``attack_mode``, before any train-mode pass. Your ``training_step`` then runs
    on x as usual (it logs, its forward is the authors' clean pass, whose logits MART reads when it calls
    ``self(x)``), then the model on x'. Logs ``adversarial/mart_boosted_ce`` and ``adversarial/mart_kl``.

    Args:
        eps: radius ε ≥ 0.
        beta: β ≥ 0 (6 in the authors' CIFAR-10 runs).
        norm: "linf" (the authors') or "l2".
        steps: steps of the inner maximisation.
        step_size: α; None: ε/4 (l∞, the authors' 2/255 at 8/255), 2ε/steps (l2).
        bounds: the box of the batch input (None: none).
        input_key: the input in the batch (see :class:`DataGradientPenalty`).
        target_key: where the batch holds the class labels (default: a tuple's second entry, or ``y``/``labels``...).
        logits_fn: ``(pl_module, batch) -> logits``; default ``pl_module(input)``.
        attack_mode: the model's mode while x' is found: "eval" or "train".
        check_finite: check each step's loss and gradients before the update.

    Raises:
        ValueError: a bad argument; a batch without integer labels; beside AdversarialTraining or TRADES (setup).

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(4, 3)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> ce = lambda b: torch.nn.functional.cross_entropy(net(b[0]), b[1])
        >>> mart = MART(0.1, logits_fn=lambda module, batch: module(batch[0]))
        >>> bool(penalized_loss(net, ce, (x, y), [mart]) > ce((x, y)))
        True
    """

    order = ORDER["MART"]  # its place in the chain: _chain.ORDER
    exclusive = EXCLUSIVE
    what_it_does = "replaces the loss with its own on x and x'"
    what_they_do = "changes the same loss or batch"

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
        target_key: Any = None,
        logits_fn: LogitsFn | None = None,
        attack_mode: AttackMode = "eval",
        check_finite: bool = True,
    ) -> None:
        super().__init__(eps, beta, norm=norm, steps=steps, step_size=step_size, bounds=bounds, logits_fn=logits_fn,
                         attack_mode=attack_mode, check_finite=check_finite)
        self.input_key, self.target_key = input_key, target_key
        self.site = Site(None, input_key, None, type(self).__name__)

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        owner = type(self).__name__
        try:
            probe = self.site.probe(ctx.module, batch)
        except TypeError as err:  # token ids: MART perturbs the input itself, and has no `target=`
            raise TypeError(f"{owner} perturbs the batch input, which is not floating point here (token ids?). For a "
                            f"token model, perturb its embeddings with TRADES(target=...) or "
                            f"AdversarialTraining(target=...). ({err})") from err
        y = class_labels(batch, self.target_key, owner)
        x_adv = self._adversarial(ctx, probe, batch, y)  # before any train-mode pass, as the authors find it
        beta = self.active_weight(ctx)

        def mart_objective() -> Tensor:  # MART's loss at the current weights: AWP moves the weights against it
            boosted, kl = mart_terms(self._logits(ctx, probe, batch),
                                     self._logits(ctx, probe, replace_input(batch, probe.path, x_adv)), y)
            return boosted + beta * kl

        ctx.adversarial_objective(mart_objective)
        with _module_outputs(ctx.module, enabled=self.logits_fn is None) as seen:
            objective = inner(batch)  # the user's step: the authors' clean pass
        clean = _the_logits(seen, len(y))
        with muted_logging(ctx.module):
            if clean is None:  # the step did not call `self(x)` once: MART's own clean pass
                with forward_pass():
                    clean = self._logits(ctx, probe, batch)
            with forward_pass():
                adv = self._logits(ctx, probe, replace_input(batch, probe.path, x_adv))
        boosted, kl = mart_terms(clean, adv, y)
        self.check_and_log(ctx, "adversarial/mart_boosted_ce", boosted, batch_size=len(y))
        self.check_and_log(ctx, "adversarial/mart_kl", kl, batch_size=len(y))
        self.applied += 1
        # MART's loss in place of the step's: the step's own loss cancels exactly (its value, and its gradient)
        return objective.add(boosted + beta * kl - objective.loss_in_objective)

    def _adversarial(self, ctx: StepContext, probe: Probe, batch: Any, y: Tensor) -> Tensor:
        def ce(u: Tensor) -> Tensor:
            return torch.nn.functional.cross_entropy(self._logits(ctx, probe, replace_input(batch, probe.path, u)), y)

        with self._attack_pass(ctx):
            return gaussian_start_ascent(ce, probe.x.detach(), self.eps, norm=self.norm, steps=self.steps,
                                         step_size=self.step_size, bounds=self.bounds,
                                         generator=self.step_generator(ctx), owner=type(self).__name__)


@contextlib.contextmanager
def _module_outputs(module: nn.Module, enabled: bool = True) -> Iterator[list[Any]]:
    """The outputs of every call of ``module`` itself (``self(x)`` inside ``training_step``) while the block runs."""
    seen: list[Any] = []
    handle = module.register_forward_hook(lambda mod, args, out: seen.append(out)) if enabled else None
    try:
        yield seen
    finally:
        if handle is not None:
            handle.remove()


def _the_logits(seen: list[Any], batch_size: int) -> Tensor | None:
    """The (B, C) logits of the step's one call of the module, or None (no call, several, or no logits)."""
    if len(seen) != 1:
        return None
    out = getattr(seen[0], "logits", seen[0])
    if isinstance(out, Tensor) and out.ndim == 2 and out.shape[0] == batch_size and out.requires_grad:
        return out
    return None
