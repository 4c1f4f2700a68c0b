"""CostMonitor: what each callback and monitor costs, in the run: its passes and its share of the step's time."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_gp._lightning.log_writer import log_table
from lightning_gp._lightning.logging import logger_step, over_ranks
from lightning_gp.monitors._base import Monitor
from lightning_gp.step._cost import STEP, PassMeter

PREFIX = "cost"
#: The callback hooks timed (each callback's work in them is its own).
HOOKS = ("on_train_batch_start", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
         "on_before_zero_grad", "on_train_batch_end")


class CostMonitor(Monitor):
    """Logs what every callback and monitor adds to a training step: forward and backward passes, share of time.

    On every ``every_n_steps``-th step (the first micro-batch of it) each callback's hooks and each penalty callback's
    part of ``training_step`` are timed apart, and the model's layers count the passes run in them, in units of the
    step's own pass. Logged as ``cost/<name>/forward_passes``, ``backward_passes``, ``passes`` (their sum) and
    ``time_fraction`` (of the step's wall time, averaged over DDP ranks), ``<name>`` a callback's class name or
    ``step`` (``training_step``, Lightning's backward and the optimizer). At the end of ``fit`` a table of the
    means goes to the console and to W&B. Off unless added: the timed step runs its hooks through wrappers and its
    layers through counting hooks (a small cost on that step only). How it counts: [Monitors](../monitors.md).

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.

    Example:


        >>> from lightning_gp import SharpnessAwareMinimization
        >>> callbacks = [SharpnessAwareMinimization(0.05), CostMonitor(every_n_steps=10)]  # Trainer(callbacks=...)
        >>> callbacks[1]
        CostMonitor(every_n_steps=10)
    """

    needs_batch = False

    def __init__(self, every_n_steps: int | None = None) -> None:
        super().__init__(every_n_steps)
        self._meter: PassMeter | None = None
        self._batch_key: tuple | None = None
        self._wrapped: list[tuple[Any, str, Any]] = []  # (callback, hook, what its __dict__ held, or None)
        #: per owner: [sum of forward passes, of backward passes, of time fractions, measurements]
        self.totals: dict[str, list[float]] = {}

    @override
    def unsupported_when_sharded(self) -> str | None:
        return None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self.totals = {}
        self._unwrap()
        names: dict[str, int] = {}
        for callback in trainer.callbacks:
            base = type(callback).__name__
            names[base] = names.get(base, 0) + 1
            name = base if names[base] == 1 else f"{base}_{names[base]}"  # two of a kind: Class, Class_2
            for hook in HOOKS:
                held = callback.__dict__.get(hook)
                callback.__dict__[hook] = self._wrap(callback, name, hook, getattr(callback, hook))
                self._wrapped.append((callback, hook, held))

    def _wrap(self, callback: Any, name: str, hook: str, original: Any) -> Any:
        def wrapped(trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> Any:
            if hook == "on_train_batch_start":
                self._maybe_start(trainer, pl_module, args[-1] if args else kwargs.get("batch_idx"))
            meter = self._meter
            if meter is None or callback is self:
                result = original(trainer, pl_module, *args, **kwargs)
            else:
                with meter.span(name):
                    result = original(trainer, pl_module, *args, **kwargs)
            if hook == "on_train_batch_end" and meter is not None and callback is trainer.callbacks[-1]:
                self._finish(trainer)
            return result

        return wrapped

    def _maybe_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch_idx: Any) -> None:
        key = (trainer.current_epoch, batch_idx)
        if key == self._batch_key:
            return  # a later callback's hook of the same batch
        self._batch_key = key
        self._close()
        if self._due(trainer):
            self._meter = PassMeter(pl_module, trainer.strategy.root_device)
            self._meter.start()

    def _finish(self, trainer: pl.Trainer) -> None:
        meter, self._meter = self._meter, None
        meter.stop()
        report = meter.report()
        if not report:
            return
        owners = list(report)
        fractions = torch.tensor([report[o]["time_fraction"] for o in owners], dtype=torch.float64
                                 if trainer.strategy.root_device.type == "cpu" else torch.float32,
                                 device=trainer.strategy.root_device)
        fractions = over_ranks(trainer, fractions).tolist()  # the passes are the same on every rank; the time is not
        values = {}
        for owner, fraction in zip(owners, fractions, strict=True):
            row = report[owner]
            values.update({f"{PREFIX}/{owner}/forward_passes": row["forward"],
                           f"{PREFIX}/{owner}/backward_passes": row["backward"],
                           f"{PREFIX}/{owner}/passes": row["forward"] + row["backward"],
                           f"{PREFIX}/{owner}/time_fraction": fraction})
            total = self.totals.setdefault(owner, [0.0, 0.0, 0.0, 0.0])
            for i, v in enumerate((row["forward"], row["backward"], fraction, 1.0)):
                total[i] += v
        self._log(trainer, values, logger_step(trainer))

    def table(self) -> str:
        """The means over the measured steps, one row per callback and the step's own, as a Markdown table."""
        lines = ["| part of the step | forward passes | backward passes | share of step time |", "|---|---:|---:|---:|"]
        rows = sorted(self.totals.items(), key=lambda kv: (kv[0] != STEP, -kv[1][2] / kv[1][3]))
        for owner, (fwd, bwd, frac, n) in rows:
            lines.append(f"| {owner} | {fwd / n:.2g} | {bwd / n:.2g} | {100 * frac / n:.0f} % |")
        return "\n".join(lines)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.totals:
            return
        rank_zero_info(f"CostMonitor: per training step, mean over {int(next(iter(self.totals.values()))[3])} "
                       f"measured steps\n{self.table()}")
        rows = [[owner, fwd / n, bwd / n, frac / n] for owner, (fwd, bwd, frac, n) in self.totals.items()]
        log_table(trainer, f"{PREFIX}/table", ["part", "forward_passes", "backward_passes", "time_fraction"], rows)

    def _close(self) -> None:
        if self._meter is not None:
            meter, self._meter = self._meter, None
            meter.close()

    def _unwrap(self) -> None:
        for callback, hook, held in reversed(self._wrapped):
            if held is None:
                callback.__dict__.pop(hook, None)
            else:
                callback.__dict__[hook] = held
        self._wrapped.clear()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()
        self._unwrap()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()
        self._unwrap()
