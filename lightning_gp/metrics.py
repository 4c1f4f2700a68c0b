"""torchmetrics metrics that reduce per-sample values across DDP ranks the way one process would.

torchmetrics already ships `MeanMetric` (a weighted mean held as two "sum" states)
and `MaxMetric`. The monitors log the mean *and* the max of several per-sample
quantities at once (input-gradient norm, parameter-gradient norm, one per layer, ...), so this module
holds the one thing missing: `PerSampleMeanMax`, the same two reductions over a vector of
quantities in a single metric, so a monitor syncs one state per logging step instead of 2·K metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_gp.functional._checks import check_positive_int


class PerSampleMeanMax(Metric):
    """Mean and max over samples of ``num_values`` per-sample quantities, exact under DDP.

    The state is the per-sample values themselves (``values``, a list state reduced by concatenation), so
    under DDP `compute` reduces the samples of all ranks together: two ranks with batches of 3 and 5
    samples report the mean over the 8 samples (weighted by each rank's sample count, which averaging the
    two rank means would not be) and their max. Holding the samples rather than running sums is what makes
    the monitors cheap: they reduce one step's samples and reset, and then an update is a list append and a
    reset a list clear (no tensor operations), where running sums cost a dozen small kernels per step. The
    memory is that of the samples since the last `reset`. Values keep their dtype (float64 stays
    float64).

    Args:
        num_values: how many quantities each sample carries (columns of the ``(B, num_values)`` update).
        kwargs: passed to `torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).

    Example:


        >>> metric = PerSampleMeanMax(num_values=2)
        >>> metric.update(torch.tensor([[1.0, 10.0], [3.0, 20.0]]))
        >>> metric.update(torch.tensor([[5.0, 0.0]]))  # one more sample, e.g. from another rank
        >>> mean, maximum = metric.compute()
        >>> mean.tolist(), maximum.tolist()
        ([3.0, 10.0], [5.0, 20.0])
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    values: list[Tensor] | Tensor

    def __init__(self, num_values: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_values = check_positive_int(num_values, "num_values", type(self).__name__)
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, values: Tensor) -> None:
        """Add a batch of per-sample values, shape ``(B,)`` when ``num_values == 1``, else ``(B, num_values)``.

        A batch of zero samples is allowed (a rank with an empty share) and changes nothing. Under DDP every
        rank must have updated (possibly with zero samples) before `compute`.
        """
        self.values.append(self._checked(values))

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean, max)``, each of shape ``(num_values,)``; NaN and -inf before any sample arrived."""
        values = self.values
        if isinstance(values, list):  # not synced (one process), or synced as a list
            values = values[0] if len(values) == 1 else dim_zero_cat(values) if values else None
        return self._mean_max(values)

    def reduce(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """`update` with one batch, `compute` and `reset` in one call: ``(mean, max)``.

        What a monitor does once per logging step. Under DDP (and when the metric holds earlier updates) it
        is exactly those three calls, the compute syncing across ranks; in a single process, where there is
        nothing to sync, the same reduction is taken directly, without torchmetrics' per-call bookkeeping
        (about as much time as the reduction itself on a small batch).

        Example:


            >>> mean, maximum = PerSampleMeanMax(num_values=2).reduce(torch.tensor([[1.0, 10.0], [3.0, 20.0]]))
            >>> mean.tolist(), maximum.tolist()
            ([2.0, 15.0], [3.0, 20.0])
        """
        if self.update_count or (self.sync_on_compute and self.distributed_available_fn()):
            self.update(values)
            mean, maximum = self.compute()
            self.reset()
            return mean, maximum
        return self._mean_max(self._checked(values))

    def _checked(self, values: Tensor) -> Tensor:
        if not isinstance(values, Tensor):
            raise TypeError(f"`values` must be a torch.Tensor, got {type(values).__name__}.")
        if values.ndim == 1 and self.num_values == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[1] != self.num_values:
            raise ValueError(
                f"`values` must have shape (B, {self.num_values}) (or (B,) for num_values=1), "
                f"got {tuple(values.shape)}."
            )
        if not values.is_floating_point():
            values = values.to(torch.get_default_dtype())
        return values.detach() if values.requires_grad else values

    def _mean_max(self, values: Tensor | None) -> tuple[Tensor, Tensor]:
        """Mean and max over the rows of ``values``, each (K,); NaN and -inf for no rows."""
        if values is None or values.numel() == 0:
            dtype = values.dtype if values is not None and values.is_floating_point() else torch.get_default_dtype()
            return (torch.full((self.num_values,), torch.nan, dtype=dtype, device=self.device),
                    torch.full((self.num_values,), -torch.inf, dtype=dtype, device=self.device))
        return values.sum(dim=0).div_(values.shape[0]), values.amax(dim=0)  # sum/n: half the time of mean()
