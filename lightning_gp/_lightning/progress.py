"""Long work inside a validation hook, counted in the progress bar Lightning is already showing.

Lightning's bars are callbacks: ``TQDMProgressBar`` holds the validation epoch's tqdm bar until
``on_validation_end``, ``RichProgressBar`` a rich task for it. Work done in ``on_validation_epoch_end`` (between
the two) takes that bar over: its total, its count and its description become the work's. Lightning closes or
hides it afterwards as it always does, so nothing needs to be put back. A progress bar of another kind gets a
tqdm bar of its own beside it; no bar, or a rank other than 0, gets none.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar


class ProgressTask:
    """``update(n)`` counts ``n`` units of work; ``close()`` ends the task (where it owns the bar)."""

    def __init__(self, advance: Any = None, close: Any = None) -> None:
        self._advance, self._close = advance, close

    def update(self, n: int) -> None:
        if self._advance is not None:
            self._advance(n)

    def close(self) -> None:
        if self._close is not None:
            self._close()


def validation_progress(trainer: pl.Trainer, description: str, total: int, unit: str = "sample") -> ProgressTask:
    """A task counting ``total`` units in the bar of the validation epoch now ending (see the module docstring)."""
    bar = trainer.progress_bar_callback
    if bar is None or not trainer.is_global_zero or not bar.is_enabled:
        return ProgressTask()
    if isinstance(bar, TQDMProgressBar):
        try:
            tqdm_bar = bar.val_progress_bar
        except TypeError:  # no validation bar was opened (none is during the sanity check's end)
            tqdm_bar = None
        if tqdm_bar is not None and not tqdm_bar.disable:
            tqdm_bar.reset(total=total)
            tqdm_bar.unit = unit
            tqdm_bar.set_description(description)
            return ProgressTask(advance=tqdm_bar.update)
    if isinstance(bar, RichProgressBar) and bar.progress is not None:
        task_id = bar.val_progress_bar_id
        if task_id is not None:
            bar.progress.update(task_id, total=total, completed=0, description=description, visible=True)

            def advance(n: int) -> None:
                bar.progress.update(task_id, advance=n)
                bar.refresh()

            return ProgressTask(advance=advance)
    from tqdm.auto import tqdm

    own = tqdm(total=total, desc=description, leave=False, unit=unit)
    return ProgressTask(advance=own.update, close=own.close)
