"""torchmetrics metrics that reduce per-sample values across DDP ranks the way one process would.

torchmetrics already ships :class:`~torchmetrics.MeanMetric` (a weighted mean held as two "sum" states)
and :class:`~torchmetrics.MaxMetric`. The monitors log the mean *and* the max of several per-sample
quantities at once (input-gradient norm, parameter-gradient norm, one per layer, ...), so this module
holds the one thing missing: :class:`PerSampleMeanMax`, the same two reductions over a vector of
quantities in a single metric, so a monitor syncs three tensors per logging step instead of 2·K metrics.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class PerSampleMeanMax(Metric):
    """Mean and max over samples of ``num_values`` per-sample quantities, exact under DDP.

    States: ``total`` (sum of values, reduced by sum), ``count`` (number of samples, reduced by sum) and
    ``max`` (reduced by max). Summing values and counts separately, as :class:`torchmetrics.MeanMetric`
    does, makes the DDP mean weighted by each rank's sample count: two ranks with batches of 3 and 5
    samples report the mean over the 8 samples, which averaging the two rank means would not.

    Args:
        num_values: how many quantities each sample carries (columns of the ``(B, num_values)`` update).
        kwargs: passed to :class:`torchmetrics.Metric` (``process_group``, ``sync_on_compute``, ...).

    Example::

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

    total: Tensor
    count: Tensor
    max: Tensor

    def __init__(self, num_values: int = 1, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_values, bool) or not isinstance(num_values, int) or num_values < 1:
            raise ValueError(f"`num_values` must be an integer >= 1, got {num_values!r}.")
        self.num_values = num_values
        dtype = torch.get_default_dtype()
        self.add_state("total", torch.zeros(num_values, dtype=dtype), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=dtype), dist_reduce_fx="sum")
        self.add_state("max", torch.full((num_values,), -torch.inf, dtype=dtype), dist_reduce_fx="max")

    def update(self, values: Tensor) -> None:
        """Add a batch of per-sample values, shape ``(B,)`` when ``num_values == 1``, else ``(B, num_values)``.

        A batch of zero samples is allowed (a rank with an empty share) and changes nothing.
        """
        if not isinstance(values, Tensor):
            raise TypeError(f"`values` must be a torch.Tensor, got {type(values).__name__}.")
        if values.ndim == 1 and self.num_values == 1:
            values = values[:, None]
        if values.ndim != 2 or values.shape[1] != self.num_values:
            raise ValueError(
                f"`values` must have shape (B, {self.num_values}) (or (B,) for num_values=1), "
                f"got {tuple(values.shape)}."
            )
        values = values.detach().to(self.total.dtype)
        # In place: the states are this metric's own tensors (reset() gives fresh copies of the defaults), and
        # an assignment would go through nn.Module.__setattr__, which costs more than the sums on small batches.
        self.total.add_(values.sum(dim=0))
        self.count.add_(values.shape[0])
        if values.shape[0]:
            torch.maximum(self.max, values.amax(dim=0), out=self.max)

    def compute(self) -> tuple[Tensor, Tensor]:
        """``(mean, max)``, each of shape ``(num_values,)``; NaN and -inf before any sample arrived."""
        return self.total / self.count, self.max.clone()
