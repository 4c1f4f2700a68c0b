"""When to log, and at which step.

A ``self.log`` call costs as much as a small model's step, and a value logged on a
step the loggers do not write is overwritten unread, so the package logs on the written steps only. The two
facts come from Lightning internals, read in :mod:`lightning_gp._lightning.private`.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_gp._lightning.private import batches_that_stepped, will_write_logs


def should_log(trainer: pl.Trainer | None) -> bool:
    """True on the steps whose ``on_step`` metrics the Trainer writes to its loggers; False without a Trainer.

    All DDP ranks agree (the condition depends on the step counter only), so ``sync_dist=True`` on the
    logging steps cannot deadlock.

    Example:


        >>> should_log(None)
        False
        >>> should_log(pl.Trainer(log_every_n_steps=1, logger=False, enable_progress_bar=False))
        True
    """
    if trainer is None:
        return False
    return will_write_logs(trainer) or bool(trainer.fast_dev_run)


def logger_step(trainer: pl.Trainer) -> int:
    """The step at which the Trainer's loggers write this batch's metrics (optimizer steps so far)."""
    return batches_that_stepped(trainer)


def over_ranks(trainer: pl.Trainer, values: Tensor, weight: float = 1.0) -> Tensor:
    """``values`` (a tensor of per-step values, each a mean over ``weight`` samples of this rank) averaged over the
    DDP ranks, each rank weighted by its samples: what one process computes on the combined batch. One all-reduce
    (of the values and the weight together); the values themselves on one process. Every rank must call it.

    Example:


        >>> over_ranks(pl.Trainer(logger=False, enable_progress_bar=False), torch.tensor([1.0, 2.0]), 4).tolist()
        [1.0, 2.0]
    """
    if trainer.world_size == 1:
        return values
    flat = values.detach().reshape(-1)
    sums = trainer.strategy.reduce(torch.cat([flat * weight, flat.new_tensor([float(weight)])]), reduce_op="sum")
    return (sums[:-1] / sums[-1]).reshape(values.shape)
