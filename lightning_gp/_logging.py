"""When to call ``self.log``: only on the steps whose values the Trainer will write to its loggers.

``LightningModule.log`` costs about 1–2 ms per call in Lightning 2.6 (the result collection copies the
call's metadata), as much as a small model's training step. Lightning itself writes step metrics to the
loggers only every ``log_every_n_steps`` (and on every step of a ``fast_dev_run``), so a value logged on
another step is overwritten before anyone reads it. :func:`should_log` is Lightning's own condition
(``trainer._logger_connector.should_update_logs``, used by ``update_train_step_metrics``), so the steps
that log line up with the steps the loggers write. Shared by the penalty callbacks and the WGAN mixin.
"""

from __future__ import annotations

from typing import Any


def should_log(trainer: Any) -> bool:
    """True on the steps whose ``on_step`` metrics the Trainer writes to its loggers; False without a Trainer.

    All DDP ranks agree (the condition depends on the step counter only), so ``sync_dist=True`` on the
    logging steps cannot deadlock.

    Example::

        >>> import lightning.pytorch as pl
        >>> should_log(None)
        False
        >>> should_log(pl.Trainer(log_every_n_steps=1, logger=False, enable_progress_bar=False))
        True
    """
    if trainer is None:
        return False
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True)) or bool(getattr(trainer, "fast_dev_run", False))
