"""When to log, and the trainer of a module: the package's only reads of Lightning internals.

Lightning has no public API for two facts the package needs, so they are read here and nowhere else, and
``tests/test_strategies_and_internals.py`` fails loudly if a Lightning release moves them:

- ``trainer._logger_connector.should_update_logs``: whether this step's ``on_step`` metrics will be written
  to the loggers (every ``log_every_n_steps``). A ``self.log`` call costs 1–2 ms in Lightning 2.6, as much as
  a small model's step, and a value logged on another step is overwritten unread.
- ``trainer.fit_loop.epoch_loop._batches_that_stepped``: the step Lightning's loggers write at (optimizer
  steps, counted once per batch however many optimizers). Lightning's own ``LearningRateMonitor`` reads it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl


def should_log(trainer: pl.Trainer | None) -> bool:
    """True on the steps whose ``on_step`` metrics the Trainer writes to its loggers; False without a Trainer.

    All DDP ranks agree (the condition depends on the step counter only), so ``sync_dist=True`` on the
    logging steps cannot deadlock.

    Example::

        >>> should_log(None)
        False
        >>> should_log(pl.Trainer(log_every_n_steps=1, logger=False, enable_progress_bar=False))
        True
    """
    if trainer is None:
        return False
    return bool(trainer._logger_connector.should_update_logs) or bool(trainer.fast_dev_run)


def logger_step(trainer: pl.Trainer) -> int:
    """The step at which the Trainer's loggers write this batch's metrics (optimizer steps so far)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def attached_trainer(module: Any) -> pl.Trainer | None:
    """``module.trainer`` for a LightningModule attached to a Trainer, else None (public API only)."""
    if not isinstance(module, pl.LightningModule):
        return None
    try:
        return module.trainer
    except RuntimeError:  # "... is not attached to a `Trainer`"
        return None
