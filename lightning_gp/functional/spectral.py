"""Spectral norms by power iteration, and the spectral-norm regularizer Σ σ(W)².

Since ‖W‖₂ ≤ ‖W‖_F, weight decay bounds a layer's Lipschitz constant only loosely; penalising σ(W)²
(Yoshida & Miyato 2017) bounds it directly. For spectral *normalization* (W / σ(W)) use PyTorch's
``torch.nn.utils.parametrizations.spectral_norm``; this module does not rewrite it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._checks import check_positive_int, check_tensor
from lightning_gp.functional._layers import SPECTRAL_PENALTY_LAYERS

#: Iterations used when no warm-start vector is given. A warm start (the ``u`` returned by the
#: previous call) needs only one: the weights move little between steps.
COLD_START_ITERS = 30

REGULARIZED_LAYERS = SPECTRAL_PENALTY_LAYERS


def _as_matrix(weight: Tensor) -> Tensor:
    """(out, in, *kernel) → (out, in·prod(kernel)): the conv kernel as the matrix of its unfolded form."""
    if weight.ndim < 2:
        raise ValueError(
            f"`weight` must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}."
        )
    return weight.reshape(weight.shape[0], -1)


def _initial_u(rows: int, like: Tensor) -> Tensor:
    # A fixed private generator: a cold start is reproducible and never consumes the global RNG, so
    # adding this regularizer does not change a run's random stream (dropout masks, shuffling, ...).
    gen = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(rows, generator=gen, dtype=like.dtype).to(like.device), dim=0)


def spectral_norm(weight: Tensor, *, n_iter: int | None = None, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Largest singular value σ of ``weight`` (conv kernels reshaped to (out, -1)) by power iteration.

    Iterates v ← normalize(Wᵀu), u ← normalize(Wv) without building a graph, then returns
    σ = uᵀWv, differentiable w.r.t. ``weight`` (its gradient is u vᵀ, as for the exact σ), and the
    updated ``u`` to pass back next step. The estimate approaches σ from below.

    Args:
        weight: a matrix or a conv kernel.
        n_iter: power iterations, >= 1; default 1 with a warm-start ``u``, else ``COLD_START_ITERS``.
        u: left singular vector estimate from a previous call, shape (out,).

    Example:

        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> sigma, u = spectral_norm(w)
        >>> round(float(sigma), 4)
        3.0
    """
    check_tensor(weight, "weight")
    mat = _as_matrix(weight)
    if n_iter is None:
        n_iter = 1 if u is not None else COLD_START_ITERS
    check_positive_int(n_iter, "n_iter")
    if u is None:
        u = _initial_u(mat.shape[0], mat)
    elif u.shape != (mat.shape[0],):
        raise ValueError(f"`u` must have shape ({mat.shape[0]},) for this weight, got {tuple(u.shape)}.")
    with torch.no_grad():
        w = mat.detach()
        u = u.to(w)
        for _ in range(n_iter):
            v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
            u = F.normalize(w @ v, dim=0, eps=1e-12)
    sigma = torch.dot(u, mat @ v)
    return sigma, u


def spectral_norm_penalty(
    module: nn.Module, *, n_iter: int | None = None, vectors: dict[str, Tensor] | None = None
) -> Tensor:
    """Σ over the weights of Linear, Conv and Bilinear layers of σ(W)², differentiable.

    Args:
        module: the model; its sub-modules of the types in ``REGULARIZED_LAYERS`` are regularized.
        n_iter: power iterations per weight (see `spectral_norm`).
        vectors: optional dict ``{"<layer name>": u}`` of warm-start vectors, read and updated in place,
            so one iteration per training step suffices; keep it in your checkpoint.

    Example:

        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> state = {}
        >>> penalty = spectral_norm_penalty(net, vectors=state)
        >>> sorted(state)
        ['0', '2']
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be an nn.Module, got {type(module).__name__}.")
    total = None
    for name, layer in module.named_modules():
        if not isinstance(layer, REGULARIZED_LAYERS):
            continue
        weight = layer.weight
        if isinstance(layer, nn.Bilinear):  # (out, in1, in2): a bilinear form per output
            weight = weight.reshape(weight.shape[0], -1)
        u = vectors.get(name) if vectors is not None else None
        sigma, u = spectral_norm(weight, n_iter=n_iter, u=u)
        if vectors is not None:
            vectors[name] = u
        total = sigma.square() if total is None else total + sigma.square()
    if total is None:
        raise ValueError(
            f"`module` ({type(module).__name__}) has no Linear, Conv or Bilinear layer to regularize."
        )
    return total
