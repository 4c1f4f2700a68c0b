"""What the monitors share: when to run, how to measure without touching training, and logging.

A monitor must never change training. Its extra forward/backward passes therefore run

- in eval mode (no dropout draw, no BatchNorm running-statistics update, and BatchNorm then acts per
  sample, so per-sample values really are per sample), each sub-module's own mode restored afterwards;
- on a forked random stream (:func:`~lightning_gp.step._chain.untraced`), so any random op in the model
  leaves the training RNG stream as it was;
- with ``torch.autograd.grad`` only (in the functional layer), so no ``.grad`` is written and DDP's
  gradient hooks never fire;

and ``requires_grad`` flags are restored even when the model raises half-way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_gp._lightning.arguments import init_repr
from lightning_gp._lightning.epoch import EpochAggregate
from lightning_gp._lightning.log_writer import log_scalars, log_settings
from lightning_gp._lightning.logging import logger_step, should_log
from lightning_gp._lightning.setup_checks import check_batch_step, check_strategy
from lightning_gp.functional._checks import check_positive_int
from lightning_gp.metrics import PerSampleMeanMax
from lightning_gp.step._chain import untraced

#: Interval used when ``every_n_steps=None`` and the trainer logs nothing (``log_every_n_steps=0``).
FALLBACK_INTERVAL = 50


@contextlib.contextmanager
def isolated(module: torch.nn.Module) -> Iterator[None]:
    """Run a measurement on ``module`` without leaving a trace on training (see the module docstring)."""
    modes = [(m, m.training) for m in module.modules()]
    flags = [(p, p.requires_grad) for p in module.parameters()]
    try:
        with untraced(module, "fork"), torch.enable_grad():
            module.eval()
            yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


class Monitor(Callback):
    """Base of the monitors: runs :meth:`measure` on every ``every_n_steps``-th optimizer step.

    The steps are those whose 1-based number is a multiple of ``every_n_steps`` — the steps Lightning
    itself logs when ``every_n_steps == log_every_n_steps`` — counted once per batch however many optimizers
    the module has. ``every_n_steps=None`` follows the trainer's ``log_every_n_steps``.
    """

    #: Whether the monitor measures on the step's batch (``training_step(self, dataloader_iter)`` hides it).
    needs_batch = True
    #: Media (histograms, tables, charts) at most every this many steps; None: 10 × the scalar interval.
    media_every_n_steps: int | None = None
    #: What the media default interval is, in scalar intervals.
    MEDIA_FACTOR = 10

    def __init__(self, every_n_steps: int | None, media_every_n_steps: int | None = None) -> None:
        if every_n_steps is not None:
            check_positive_int(every_n_steps, "every_n_steps", type(self).__name__)
        if media_every_n_steps is not None:
            check_positive_int(media_every_n_steps, "media_every_n_steps", type(self).__name__)
        self.every_n_steps = every_n_steps
        self.media_every_n_steps = media_every_n_steps
        self._interval = every_n_steps or FALLBACK_INTERVAL
        self._last_step = -1
        #: The scalars of the latest measurement, on every rank (loggers only write from rank 0), and its step.
        self.last_logged: dict[str, float] = {}
        self.last_logged_step: int | None = None
        self._metric: PerSampleMeanMax | None = None
        self._last_media_step: int | None = None
        self._epoch = EpochAggregate()  # each value's epoch mean (the max of `*_max` keys), over all ranks

    def __repr__(self) -> str:
        return init_repr(self)

    @property
    def interval(self) -> int:
        """The resolved ``every_n_steps``."""
        return self._interval

    def unsupported_when_sharded(self) -> str | None:
        """Why the monitor cannot run under FSDP2 (``ModelParallelStrategy``); None where it can."""
        return "it reads whole parameters"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._last_step = -1
        self._last_media_step = None
        self._epoch.reset()
        if stage == "fit":
            check_strategy(trainer, type(self).__name__, self.unsupported_when_sharded())
            if self.needs_batch:
                check_batch_step(pl_module, type(self).__name__)
            log_settings(trainer, self)
        if self.every_n_steps is None:
            self._interval = trainer.log_every_n_steps or FALLBACK_INTERVAL

    def _due(self, trainer: pl.Trainer) -> bool:
        """True once per due step (the first micro-batch of it, with gradient accumulation)."""
        step = logger_step(trainer)
        if (step + 1) % self._interval or step == self._last_step:
            return False
        self._last_step = step
        return True

    def _media_due(self, step: int) -> bool:
        """Whether the measurement at ``step`` also logs media: at least ``media_every_n_steps`` (default 10 × the
        scalar interval) steps after the last media, the first measurement included. The same on every rank."""
        interval = self.media_every_n_steps or self.MEDIA_FACTOR * self._interval
        if self._last_media_step is not None and step - self._last_media_step < interval:
            return False
        self._last_media_step = step
        return True

    def _reduce_per_sample(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and max over the samples of all ranks of a (B, K) matrix of per-sample values (a collective
        under DDP), through the monitor's :class:`~lightning_gp.metrics.PerSampleMeanMax`."""
        if self._metric is None or self._metric.num_values != columns.shape[1]:
            self._metric = PerSampleMeanMax(columns.shape[1])
        if self._metric.device != columns.device:  # Metric.to walks every state: only when it has to move
            self._metric = self._metric.to(columns.device)
        return self._metric.reduce(columns)

    def _log(self, trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
        """Log the (already rank-reduced) scalars of a measurement at ``step``, in the step's one row.

        On a step the Trainer writes, and when every step it writes is a measured one (``log_every_n_steps``
        a multiple of the interval, as with the default ``every_n_steps=None``), through ``self.log``: the
        values join the module's own in Lightning's row and ``callback_metrics``. Otherwise straight to the
        loggers, as Lightning's ``LearningRateMonitor`` does: Lightning writes a ``self.log`` value again at
        every later logging step of the epoch, which would misdate a measurement it was not refreshed for.
        """
        self.last_logged = {k: float(v) for k, v in metrics.items()}
        self.last_logged_step = step
        device = trainer.strategy.root_device
        for key, value in self.last_logged.items():
            self._epoch.update(key, torch.tensor(value, device=device))
        every = trainer.log_every_n_steps
        if trainer.barebones:  # which forbids self.log and has no logger: `last_logged` holds the values
            return
        if every and every % self._interval == 0 and step == logger_step(trainer) and should_log(trainer):
            module = trainer.lightning_module
            for key, value in self.last_logged.items():  # the class's method: a user's `log` override sees only theirs
                pl.LightningModule.log(module, key, value, on_step=True, on_epoch=False, batch_size=1)
        else:
            log_scalars(trainer, self.last_logged, step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log each value's epoch aggregate as ``<key>_epoch`` (the max of ``*_max`` keys, else the mean),
        into ``callback_metrics``, so that ``EarlyStopping``/``ModelCheckpoint`` can monitor it whatever
        ``log_every_n_steps`` is. Not sent to the loggers, which keep one row per step."""
        if self._epoch and not trainer.barebones:
            values = {f"{k}_epoch": v for k, v in self._epoch.compute().items()}
            for key, value in values.items():  # the class's method: a user's override of `log` sees only theirs
                # batch_size: the value is already the epoch's (and a dataloader_iter step has no batch to infer)
                pl.LightningModule.log(pl_module, key, value, on_step=False, on_epoch=True, logger=False, batch_size=1)
        self._epoch.reset()

