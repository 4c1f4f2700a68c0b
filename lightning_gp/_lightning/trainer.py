"""What the package reads off the Trainer a module is attached to (public Lightning API only)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def attached_trainer(module: Any) -> pl.Trainer | None:
    """``module.trainer`` for a LightningModule attached to a Trainer, else None.

    Example:


        >>> attached_trainer(pl.LightningModule()) is None
        True
    """
    if not isinstance(module, pl.LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None


def grad_scaler(trainer: pl.Trainer | None) -> Any:
    """The precision plugin's enabled ``GradScaler`` (``precision="16-mixed"``), or None."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale(trainer: pl.Trainer | None) -> float:
    """The scale of the step's backward: the GradScaler's (updated only in the optimizer step, after
    ``on_after_backward``, so this is the one the backward used), 1 without one."""
    scaler = grad_scaler(trainer)
    return 1.0 if scaler is None else float(scaler.get_scale())
