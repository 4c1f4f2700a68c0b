"""The ``<name>_epoch`` values of the callbacks and monitors: one aggregator, one meaning, all ranks counted."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric


class EpochAggregate:
    """Running per-name aggregates of one epoch, reduced over the DDP ranks when computed.

    A name ending in ``_max`` keeps the maximum; any other the weighted mean (weights: the samples behind each
    value for a penalty, 1 per measurement for a monitor). Kept as running sums, O(1) per name, and reduced
    by torchmetrics' ``MeanMetric``/``MaxMetric`` (``sync_on_compute``), so ranks weigh by their samples. Every
    rank must call :meth:`compute` with the same names (all ranks log on the same steps).

    Example:


        >>> agg = EpochAggregate()
        >>> agg.update("loss", torch.tensor(1.0), weight=3); agg.update("loss", torch.tensor(2.0), weight=1)
        >>> agg.update("norm_max", torch.tensor(5.0)); agg.update("norm_max", torch.tensor(4.0))
        >>> {k: round(float(v), 4) for k, v in agg.compute().items()}
        {'loss': 1.25, 'norm_max': 5.0}
    """

    def __init__(self) -> None:
        self._values: dict[str, tuple[Tensor, float]] = {}

    def __bool__(self) -> bool:
        return bool(self._values)

    def update(self, name: str, value: Tensor, weight: float = 1) -> None:
        """Add ``value`` (a scalar tensor, detached here) with ``weight`` to ``name``'s aggregate."""
        value = value.detach().float().reshape(())
        held = self._values.get(name)
        if name.endswith("_max"):
            self._values[name] = (value if held is None else torch.maximum(held[0], value), 1)
        else:
            total, count = held if held is not None else (0.0, 0.0)
            self._values[name] = (total + value * weight, count + weight)

    def compute(self) -> dict[str, Tensor]:
        """Each name's epoch value over all ranks (a collective under DDP)."""
        out = {}
        for name, (value, weight) in self._values.items():
            if name.endswith("_max"):
                metric = MaxMetric(sync_on_compute=True).to(value.device)
                metric.update(value)
            else:
                metric = MeanMetric(sync_on_compute=True).to(value.device)
                metric.update(value / weight, torch.tensor(float(weight), device=value.device))
            out[name] = metric.compute()
        return out

    def reset(self) -> None:
        self._values = {}
