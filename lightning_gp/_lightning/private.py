"""Every private name of Lightning (and torchmetrics) that lightning-gp reads, each behind one accessor.

Lightning has no public API for these facts; nothing else in the package touches a private attribute or
module of Lightning, and ``tests/_lightning/test_private_names.py`` fails and names the accessor when a release moves
one. torch's private names live in :mod:`lightning_gp.functional._torch_private`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lightning_gp.functional._torch_private import compiled_original

__all__ = ["batches_that_stepped", "callback_state_key", "compiled_modules", "fabric_autocast_dtype",
           "fabric_internal_gradients", "logger_prefix", "merge_initial_hparams", "metric_update_count",
           "set_metric_update_count", "will_write_logs"]


def will_write_logs(trainer: Any) -> bool:
    """Whether this step's ``on_step`` metrics will be written to the loggers (every ``log_every_n_steps``):
    ``trainer._logger_connector.should_update_logs``."""
    return bool(trainer._logger_connector.should_update_logs)


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning's loggers write at (optimizer steps, counted once per batch however many optimizers):
    ``trainer.fit_loop.epoch_loop._batches_that_stepped``, which Lightning's own ``LearningRateMonitor`` reads."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def metric_update_count(metric: Any) -> int:
    """How many times a torchmetrics ``Metric`` was updated (``Metric.update_count``, backed by ``_update_count``)."""
    return metric.update_count


def set_metric_update_count(metric: Any, count: int) -> None:
    """Set a ``Metric``'s update count back (``_update_count``: torchmetrics has no public setter), and drop its
    cached ``compute()`` result (``_computed``), which an update would have dropped too."""
    metric._update_count = count
    metric._computed = None


def fabric_autocast_dtype(module: Any) -> Any:
    """The autocast dtype of a Fabric-wrapped module under ``bf16-mixed``/``16-mixed``, else None.

    Fabric enters autocast inside the wrapped module's forward only, so code around the forward cannot see it
    with ``torch.is_autocast_enabled``; the wrapper keeps its strategy (``_FabricModule._strategy``), whose
    precision plugin is public.
    """
    from lightning.fabric.plugins.precision.amp import MixedPrecision
    from lightning.fabric.wrappers import _FabricModule

    if not isinstance(module, _FabricModule):
        return None
    precision = module._strategy.precision
    if not isinstance(precision, MixedPrecision):
        return None
    return torch.bfloat16 if precision.precision == "bf16-mixed" else torch.float16


@contextlib.contextmanager
def fabric_internal_gradients() -> Iterator[None]:
    """Let gradients taken inside the block pass Fabric's guard on its wrapped modules' outputs.

    Under precisions whose backward Fabric must run (``bf16-mixed``), a ``_FabricModule`` hooks its outputs and
    raises "call `fabric.backward(loss)`" on any other backward; ``fabric.backward`` sets
    ``lightning.fabric.wrappers._in_fabric_backward`` around its own. The penalties' internal gradients (an input
    gradient, a finite difference's second pass) are not the training backward, so they set it too.
    """
    import lightning.fabric.wrappers as wrappers

    previous = wrappers._in_fabric_backward
    wrappers._in_fabric_backward = True
    try:
        yield
    finally:
        wrappers._in_fabric_backward = previous


def merge_initial_hparams(module: Any, values: Mapping[str, Any]) -> None:
    """Add ``values`` to a LightningModule's ``hparams`` and ``hparams_initial``, keys already there winning.

    ``hparams_initial`` (what the loggers record) is only written by ``save_hyperparameters``, which also
    overwrites the user's snapshot and their ``logger=`` choice; so the snapshot is extended directly.
    """
    for key, value in values.items():
        module.hparams.setdefault(key, value)
    initial = getattr(module, "_hparams_initial", None)
    if initial is None:
        module._hparams_initial = type(module.hparams)(module.hparams)
    else:
        for key, value in values.items():
            initial.setdefault(key, value)


def compiled_modules(root: Any) -> list[str]:
    """Names of the ``torch.compile``d modules in ``root`` ("" for ``root`` itself when Lightning compiled it).

    torch's compiled wrapper is found by :func:`~lightning_gp.functional._torch_private.compiled_original`;
    Lightning's ``from_compiled`` (a compiled LightningModule given to ``Trainer.fit``) sets ``_compiler_ctx``.
    """
    names = [name for name, m in root.named_modules() if compiled_original(m) is not None]
    if getattr(root, "_compiler_ctx", None) is not None and "" not in names:
        names.insert(0, "")
    return names


def callback_state_key(callback: Any, **fields: Any) -> str:
    """A callback's checkpoint key from its class and ``fields``, as Lightning's own callbacks build theirs
    (``Callback._generate_state_key``, what ``EarlyStopping`` and ``ModelCheckpoint`` call)."""
    return callback._generate_state_key(**fields)


def logger_prefix(logger: Any) -> str:
    """The ``prefix=`` a Lightning logger puts before every metric key (``WandbLogger(prefix="exp")`` logs
    ``exp-<key>``, joined by the public ``LOGGER_JOIN_CHAR``); the loggers keep it as ``_prefix``."""
    return str(getattr(logger, "_prefix", "") or "")
