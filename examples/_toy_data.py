"""The 2-D toy distributions of the WGAN-GP paper and the metrics used to score generators on them.

Distributions (``sample(name, n)``):

- ``"8gaussians"``: 8 modes evenly spaced on a ring of radius 2, σ = 0.02 (VEEGAN's and PacGAN's ring).
- ``"25gaussians"``: a 5 × 5 grid, means {−4, −2, 0, 2, 4}², σ = 0.05 (PacGAN's grid).
- ``"swissroll"``: scikit-learn's Swiss roll (noise 0.25), its (x, z) plane scaled by 1/7.5 as in the
  WGAN-GP toy code; it has no modes, only the Wasserstein estimate applies.

Metrics, following PacGAN (Lin et al. 2018), who follow VEEGAN (Srivastava et al. 2017):

- a generated sample is *high quality* if its distance to the nearest mode mean is at most 3σ;
- a mode is *captured* if at least one high-quality sample has it as nearest mode;
- PacGAN scores 2,500 generated samples per evaluation; so do we by default.

The Wasserstein-1 estimate is the exact optimal-transport cost between two equal-size empirical samples
(an assignment problem, solved by ``scipy.optimize.linear_sum_assignment``). With n samples it is biased
upwards by the sampling noise: :func:`wasserstein1_floor` gives that floor (two real samples of the same
size), the value a perfect generator would score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

DATASETS = ("8gaussians", "25gaussians", "swissroll")


@dataclass(frozen=True)
class ModeSpec:
    """Mode means (k, 2) and the per-coordinate standard deviation of every mode."""

    means: Tensor
    sigma: float


@cache  # called for every batch drawn; the means never change
def mode_spec(name: str) -> ModeSpec | None:
    """The modes of a toy set, or ``None`` for the Swiss roll (a continuous manifold, no modes)."""
    if name == "8gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        return ModeSpec(2.0 * torch.stack([angles.cos(), angles.sin()], dim=1), 0.02)
    if name == "25gaussians":
        grid = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0], dtype=torch.float64)
        return ModeSpec(torch.cartesian_prod(grid, grid), 0.05)
    if name == "swissroll":
        return None
    raise ValueError(f"Unknown toy dataset {name!r}; choose one of {DATASETS}.")


def sample(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` float32 samples (n, 2) of a toy set; modes are picked uniformly at random.

    Example::

        >>> x = sample("25gaussians", 1000, torch.Generator().manual_seed(0))
        >>> x.shape, x.dtype
        (torch.Size([1000, 2]), torch.float32)
    """
    if n < 1:
        raise ValueError(f"`n` must be a positive sample count, got {n}.")
    spec = mode_spec(name)
    if spec is not None:
        idx = torch.randint(len(spec.means), (n,), generator=generator)
        noise = torch.randn(n, 2, generator=generator, dtype=torch.float64) * spec.sigma
        return (spec.means[idx] + noise).float()
    # Swiss roll, drawn with torch's generator so one seed drives everything (sklearn's formula).
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator, dtype=torch.float64))
    xz = torch.stack([t * t.cos(), t * t.sin()], dim=1)
    xz = xz + 0.25 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (xz / 7.5).float()


class ToyStream(torch.utils.data.IterableDataset):
    """An endless stream of fresh batches (WGAN-GP takes a new real batch for every critic step).

    Use with ``DataLoader(ToyStream(...), batch_size=None)``: each item already is a whole batch, so
    no per-sample collation cost.
    """

    def __init__(self, name: str, batch_size: int, seed: int = 0) -> None:
        mode_spec(name)  # validates the name
        self.name, self.batch_size, self.seed = name, batch_size, seed

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        while True:
            yield sample(self.name, self.batch_size, gen)


@dataclass(frozen=True)
class ModeCoverage:
    modes_captured: int
    num_modes: int
    high_quality: float  # fraction in [0, 1]


def mode_coverage(samples: Tensor, spec: ModeSpec, n_sigma: float = 3.0) -> ModeCoverage:
    """PacGAN's modes captured and fraction of high-quality samples (see the module docstring).

    Example::

        >>> spec = mode_spec("25gaussians")
        >>> mode_coverage(spec.means, spec)
        ModeCoverage(modes_captured=25, num_modes=25, high_quality=1.0)
    """
    x = samples.detach().to("cpu", torch.float64).reshape(-1, 2)
    dist = torch.cdist(x, spec.means)
    nearest_dist, nearest = dist.min(dim=1)
    good = nearest_dist <= n_sigma * spec.sigma
    captured = torch.unique(nearest[good]).numel()
    return ModeCoverage(int(captured), len(spec.means), float(good.double().mean()) if len(x) else 0.0)


def wasserstein1(a: Tensor, b: Tensor) -> float:
    """Exact W1 (Euclidean ground cost) between two empirical samples of the same size.

    The optimal coupling of two uniform n-point measures is a permutation (Birkhoff), so W1 is the
    mean cost of an optimal assignment. O(n³): n = 500 takes ~0.1 s, n = 1000 ~1 s.

    Example::

        >>> a = torch.randn(200, 2)
        >>> round(wasserstein1(a, a + torch.tensor([3.0, 4.0])), 6)
        5.0
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"`a` and `b` must be (n, d) samples of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    cost = torch.cdist(a.detach().cpu().double(), b.detach().cpu().double()).numpy()
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def wasserstein1_floor(name: str, n: int, seed: int = 12345) -> float:
    """W1 between two independent real samples of size ``n``: the score of a perfect generator."""
    gen = torch.Generator().manual_seed(seed)
    return wasserstein1(sample(name, n, gen), sample(name, n, gen))


def density_grid(name: str, lim: float, steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X, Y, density) on a square grid, for drawing the real distribution under generated samples.

    Mixtures use their exact density; the Swiss roll a histogram of 200k samples.
    """
    xs = np.linspace(-lim, lim, steps)
    gx, gy = np.meshgrid(xs, xs)
    spec = mode_spec(name)
    if spec is not None:
        means = spec.means.numpy()
        d2 = (gx[..., None] - means[:, 0]) ** 2 + (gy[..., None] - means[:, 1]) ** 2
        dens = np.exp(-d2 / (2 * spec.sigma**2)).sum(-1)
    else:
        pts = sample(name, 200_000, torch.Generator().manual_seed(0)).numpy()
        edges = np.linspace(-lim, lim, steps + 1)
        hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=[edges, edges])
        dens = hist
    return gx, gy, dens
