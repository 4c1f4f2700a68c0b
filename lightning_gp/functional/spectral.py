"""Spectral norms by power iteration, and the spectral-norm regularizer Σ σ(W)².

Since ‖W‖₂ ≤ ‖W‖_F, weight decay bounds a layer's Lipschitz constant only loosely; penalising σ(W)²
(Yoshida & Miyato 2017) bounds it directly. For spectral *normalization* (W / σ(W)) use PyTorch's
``torch.nn.utils.parametrizations.spectral_norm``; this module does not rewrite it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._checks import check_positive_int, check_tensor
from lightning_gp.functional._layers import SPECTRAL_PENALTY_LAYERS
from lightning_gp.functional._rng import seeded_generator

#: Iterations used when no warm-start vector is given. A warm start (the ``u`` returned by the
#: previous call) needs only one: the weights move little between steps.
COLD_START_ITERS = 30

REGULARIZED_LAYERS = SPECTRAL_PENALTY_LAYERS


def _check_weight(weight: object, name: str = "weight") -> Tensor:
    check_tensor(weight, name)
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"`{name}` is an uninitialized parameter (a Lazy module before its first forward pass), so it has no "
            f"singular values yet. Run one forward pass on a batch first (e.g. `model(x)`), then regularize it."
        )
    if not weight.is_floating_point():
        raise TypeError(
            f"`{name}` must be floating point, got dtype {weight.dtype}. Power iteration needs real-valued "
            f"matrices: convert it first, e.g. `{name}.float()`."
        )
    return weight


def _as_matrix(weight: Tensor) -> Tensor:
    """(out, in, *kernel) → (out, in·prod(kernel)): the conv kernel as the matrix of its unfolded form."""
    if weight.ndim < 2:
        raise ValueError(
            f"`weight` must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}."
        )
    return weight.reshape(weight.shape[0], math.prod(weight.shape[1:]))  # also for a layer with 0 outputs


def _initial_u(rows: int, like: Tensor) -> Tensor:
    # A fixed private generator: a cold start is reproducible and never consumes the global RNG, so
    # adding this regularizer does not change a run's random stream (dropout masks, shuffling, ...).
    gen = seeded_generator("cpu", 0)  # on the CPU: the same start on every device
    return F.normalize(torch.randn(rows, generator=gen, dtype=like.dtype).to(like.device), dim=0)


def spectral_norm(weight: Tensor, *, n_iter: int | None = None, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Largest singular value σ of ``weight`` (conv kernels reshaped to (out, -1)) by power iteration.

    Iterates v ← normalize(Wᵀu), u ← normalize(Wv) without building a graph, then returns
    σ = uᵀWv, differentiable w.r.t. ``weight`` (its gradient is u vᵀ, as for the exact σ), and the
    updated ``u`` to pass back next step. The estimate approaches σ from below.

    Args:
        weight: a matrix or a conv kernel.
        n_iter: power iterations, >= 1; default 1 with a warm-start ``u``, else ``COLD_START_ITERS``.
        u: left singular vector estimate from a previous call, shape (out,). One that collapsed to 0 (on an
            all-zero weight) is drawn again, with the cold start's iterations.

    Example:


        >>> w = torch.diag(torch.tensor([3.0, 1.0]))
        >>> sigma, u = spectral_norm(w)
        >>> round(float(sigma), 4)
        3.0
    """
    _check_weight(weight)
    mat = _as_matrix(weight)
    if u is not None:
        check_tensor(u, "u")
        if u.shape != (mat.shape[0],):
            raise ValueError(f"`u` must have shape ({mat.shape[0]},) for this weight, got {tuple(u.shape)}.")
        if not bool(u.detach().any()):  # collapsed to 0 on a zero weight: draw it again
            u = None
    return _power_iteration(mat, n_iter=n_iter, u=u)


def _power_iteration(mat: Tensor, *, n_iter: int | None, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """σ and the updated ``u`` of the matrix ``mat``; a cold start (``u`` None) runs ``COLD_START_ITERS``."""
    if n_iter is None:
        n_iter = 1 if u is not None else COLD_START_ITERS
    check_positive_int(n_iter, "n_iter")
    if u is None:
        u = _initial_u(mat.shape[0], mat)
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
    if n_iter is not None:
        check_positive_int(n_iter, "n_iter")
    if vectors is not None and not isinstance(vectors, dict):
        raise TypeError(f"`vectors` must be a dict {{layer name: u}} or None, got {type(vectors).__name__}.")
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, REGULARIZED_LAYERS):
            weight = _check_weight(layer.weight, f"{name or type(module).__name__}.weight")
            if isinstance(layer, nn.Bilinear):  # (out, in1, in2): a bilinear form per output
                weight = weight.reshape(weight.shape[0], -1)
            layers.append((name, _as_matrix(weight)))
    if not layers:
        raise ValueError(
            f"`module` ({type(module).__name__}) has no Linear, Conv or Bilinear layer to regularize."
        )
    warm = {name: vectors.get(name) for name, _ in layers} if vectors is not None else {}
    for name, mat in layers:
        u = warm.get(name)
        if u is not None and tuple(u.shape) != (mat.shape[0],):
            raise ValueError(
                f"`vectors[{name!r}]` has shape {tuple(u.shape)}, but layer {name!r} has {mat.shape[0]} outputs "
                f"now (a `vectors` dict kept from another model?). Pass a fresh dict, or delete that entry."
            )
    present = [name for name, u in warm.items() if u is not None]
    redrawn = set()
    if present:  # vectors that collapsed to 0 on a zero weight are drawn again (one host sync for all)
        device = warm[present[0]].device
        alive = torch.stack([warm[name].detach().any().to(device) for name in present]).tolist()
        for name, ok in zip(present, alive, strict=True):
            if not ok:
                warm[name] = None
                redrawn.add(name)
    total = None
    for name, mat in layers:
        # a redrawn vector starts cold, so it takes the cold start's iterations: with the warm setting (1) it
        # lagged far behind σ (0.39 against 0.74 after 8 steps of a layer that started at zero)
        iters = max(n_iter or 1, COLD_START_ITERS) if name in redrawn else n_iter
        sigma, u = _power_iteration(mat, n_iter=iters, u=warm.get(name))
        if vectors is not None:
            vectors[name] = u
        total = sigma.square() if total is None else total + sigma.square()
    return total
