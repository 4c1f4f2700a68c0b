"""The penalty callbacks for LightningModules with manual optimization (GANs, SAM-style loops, ...).

With ``automatic_optimization = False`` Lightning does not own the backward, so the callbacks cannot wrap
``training_step``. Instead the module computes its objective with :func:`penalized_loss` (or the
:class:`PenaltyMixin` method) and passes it to ``self.manual_backward``; the same code path as the
callbacks runs (same math, same extra-pass rules, same ``penalty/<name>`` logs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_gp._lightning.private import fabric_internal_gradients
from lightning_gp._lightning.trainer import attached_trainer
from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.callbacks.parameter_penalty import ParameterGradientPenalty
from lightning_gp.functional._checks import check_callable
from lightning_gp.step._chain import run_chain
from lightning_gp.step._objective import extract_loss


def penalized_loss(
    module: nn.Module,
    loss_fn: Callable[[Any], Tensor],
    batch: Any,
    penalties: Sequence[PenaltyCallback],
    *,
    global_step: int | None = None,
) -> Tensor:
    """``loss_fn(batch)`` plus every penalty's term, ready for ``manual_backward``.

    The callbacks' own code path (same math, extra-pass rules, logs). In a module: :class:`PenaltyMixin`.

    Args:
        module: the module whose parameters are penalised (usually ``self``); it also receives the logs
            (when it is a LightningModule attached to a Trainer).
        loss_fn: maps the batch to the scalar loss (the batch mean for the data penalty's default
            ``loss_reduction="mean"``). Called more than once for adversarial training and finite
            differences; only the first (primary) call's ``self.log`` calls are kept.
        batch: its argument (the input is found with each penalty's ``input_key``).
        penalties: callback objects (``DataGradientPenalty(...)`` etc.), *not* also passed to the Trainer.
            Keep them on the module so their state (spectral vectors) persists between steps.
        global_step: the step for ``every_n_steps``; default ``module.trainer.global_step`` (0 without one).

    Raises:
        TypeError: an element of ``penalties`` that is not a lightning_gp penalty callback, or a bad ``module``.
        ValueError: a ``ParameterGradientPenalty`` on a ``module`` with no parameter that requires grad.

    Example:


        >>> import torch
        >>> from lightning_gp.callbacks import DataGradientPenalty
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> loss_fn = lambda b: torch.nn.functional.mse_loss(net(b[0]), b[1])
        >>> total = penalized_loss(net, loss_fn, (x, y), [DataGradientPenalty(0.5)])
        >>> # per-sample ∇ₓℓᵢ = 2(fᵢ − yᵢ)·w, so the penalty is mean 4(fᵢ − yᵢ)²‖w‖²
        >>> expected = loss_fn((x, y)) + 0.5 * 4 * ((net(x) - y) ** 2).mean() * net.weight.square().sum()
        >>> torch.allclose(total, expected)
        True
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module (usually `self`), got {type(module).__name__}.")
    check_callable(loss_fn, "loss_fn", "a callable mapping the batch to the loss", "penalized_loss")
    if isinstance(penalties, PenaltyCallback):
        raise TypeError("`penalties` must be a sequence of callbacks, got a single one. Wrap it: `[penalty]`.")
    needs_params = [type(p).__name__ for p in penalties if isinstance(p, ParameterGradientPenalty)]
    if needs_params and not any(p.requires_grad for p in module.parameters()):
        raise ValueError(
            f"`module` ({type(module).__name__}) has no parameter that requires grad, so {needs_params[0]} has no "
            f"‖∇θL‖ to penalise. Unfreeze it (`module.requires_grad_()`), pass the module that owns the trained "
            f"parameters, or leave that penalty out."
        )
    trainer = attached_trainer(module)
    if global_step is None:
        global_step = trainer.global_step if trainer is not None else 0
    for p in penalties:
        if not isinstance(p, PenaltyCallback):
            raise TypeError(f"`penalties` must hold lightning_gp callbacks, got {type(p).__name__}.")
    strategy = trainer.strategy if trainer is not None else None
    with fabric_internal_gradients():  # a Fabric-wrapped module: its guard is for the training backward only
        out = run_chain(module, loss_fn, list(penalties), (batch,), {}, global_step, strategy)
    return extract_loss(out, "penalized_loss")


class PenaltyMixin:
    """Adds :meth:`penalized_loss` to a LightningModule with manual optimization (see :func:`penalized_loss`).

    Example:


        >>> import lightning.pytorch as pl
        >>> import torch
        >>> from lightning_gp import DataGradientPenalty
        >>> class Net(PenaltyMixin, pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(3, 1)
        >>> net, x = Net(), torch.randn(4, 3)
        >>> loss = net.penalized_loss(lambda b: net.layer(b).square().mean(), x, [DataGradientPenalty(0.1)])
        >>> bool(loss > net.layer(x).square().mean())
        True
    """

    def penalized_loss(
        self, loss_fn: Callable[[Any], Tensor], batch: Any, penalties: Sequence[PenaltyCallback]
    ) -> Tensor:
        """:func:`penalized_loss` with this module: ``loss_fn(batch)`` plus every penalty's term.

        Args:
            loss_fn: maps the batch to the scalar loss; called again by extra passes (their logs dropped).
            batch: its argument.
            penalties: callback objects kept on the module (not passed to the Trainer).

        Example:

            class GAN(PenaltyMixin, pl.LightningModule):
                def __init__(self):
                    super().__init__()
                    self.automatic_optimization = False
                    self.penalties = [DataGradientPenalty(1.0, center=1.0)]

                def training_step(self, batch, batch_idx):
                    opt = self.optimizers()
                    loss = self.penalized_loss(lambda b: self.critic_loss(b), batch, self.penalties)
                    opt.zero_grad()
                    self.manual_backward(loss)
                    opt.step()
        """
        return penalized_loss(self, loss_fn, batch, penalties)
