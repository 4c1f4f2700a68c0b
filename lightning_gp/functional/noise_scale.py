"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of Large-Batch Training").

With G the true gradient and Σ the per-sample gradients' covariance, B_simple = tr(Σ)/|G|² estimates the critical
batch size: training with batches much smaller than it wastes steps, much larger wastes samples. From the
per-sample gradients gᵢ of N samples and their mean ḡ:

    E‖gᵢ‖² = |G|² + tr Σ,        E‖ḡ‖² = |G|² + tr Σ / N,

two equations for the two unknowns. :func:`noise_scale` solves them from S = mean ‖gᵢ‖² and ‖ḡ‖² (unbiased: tr Σ is
the trace of the sample covariance with its N − 1); :func:`two_batch_noise_scale` from the squared norms of two
mean gradients over batches of different sizes (the paper's Appendix A, what data parallelism gives: a rank's
gradient and the all-reduced one). Either estimate is noisy, and |G|² can come out negative on one batch: the
paper smooths numerator and denominator separately over steps before dividing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["NoiseScale", "noise_scale", "two_batch_noise_scale"]


class NoiseScale(NamedTuple):
    """An estimate of the gradient noise scale and its two ingredients.

    Attributes:
        trace_sigma: tr Σ, the per-sample gradients' total variance.
        grad_sq: |G|², the squared norm of the true gradient.
        b_simple: tr Σ / |G|², the critical batch size (inf or negative where ``grad_sq`` is not positive).
    """

    trace_sigma: Tensor
    grad_sq: Tensor
    b_simple: Tensor


def _ratio(trace_sigma: Tensor, grad_sq: Tensor) -> Tensor:
    return trace_sigma / grad_sq


def _tensor(value: Tensor | float) -> Tensor:
    """A Python number as a float64 tensor (float32 would round the estimate's difference of near-equal terms)."""
    return value if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)


def noise_scale(per_sample_sq_mean: Tensor | float, mean_grad_sq: Tensor | float, n: int) -> NoiseScale:
    """The unbiased one-batch estimate from S = mean ‖gᵢ‖² over the samples and ‖ḡ‖² of their mean gradient.

    Args:
        per_sample_sq_mean: S, the mean over samples of the per-sample gradients' squared norms.
        mean_grad_sq: ‖ḡ‖², the squared norm of the mean gradient over ``n`` samples (S may come from a subset).
        n: the number of samples behind ḡ (≥ 2).

    Raises:
        ValueError: ``n`` < 2 (one sample says nothing of the variance).

    Example:


        >>> g = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # three per-sample gradients
        >>> est = noise_scale(g.square().sum(1).mean(), g.mean(0).square().sum(), 3)
        >>> torch.allclose(est.trace_sigma, torch.cov(g.T).trace())  # the sample covariance's trace
        True
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"noise_scale: `n` must be the number of samples behind the mean gradient, an int ≥ 2 "
                         f"(one sample has no variance), got {n!r}.")
    s, g2 = _tensor(per_sample_sq_mean), _tensor(mean_grad_sq)
    trace_sigma = (s - g2) * (n / (n - 1))
    grad_sq = (n * g2 - s) / (n - 1)
    return NoiseScale(trace_sigma, grad_sq, _ratio(trace_sigma, grad_sq))


def two_batch_noise_scale(small_sq: Tensor | float, big_sq: Tensor | float, b_small: int, b_big: int) -> NoiseScale:
    """The paper's two-batch estimate from ‖g‖² of mean gradients over ``b_small`` and ``b_big`` samples.

    Under data parallelism ``small_sq`` is the ranks' mean of their own gradient's squared norm (b_small samples
    each) and ``big_sq`` that of the all-reduced gradient (b_big = ranks × b_small).

    Raises:
        ValueError: ``b_big`` not larger than ``b_small``.

    Example:


        >>> est = two_batch_noise_scale(small_sq=2.0, big_sq=1.25, b_small=4, b_big=16)
        >>> float(est.grad_sq), float(est.trace_sigma)  # E‖g_b‖² = 1 + 4/b
        (1.0, 4.0)
    """
    if not (isinstance(b_small, int) and isinstance(b_big, int) and 1 <= b_small < b_big):
        raise ValueError(f"two_batch_noise_scale: need 1 ≤ b_small < b_big (ints), got b_small={b_small!r}, "
                         f"b_big={b_big!r}.")
    small, big = _tensor(small_sq), _tensor(big_sq)
    grad_sq = (b_big * big - b_small * small) / (b_big - b_small)
    trace_sigma = (small - big) / (1 / b_small - 1 / b_big)
    return NoiseScale(trace_sigma, grad_sq, _ratio(trace_sigma, grad_sq))
