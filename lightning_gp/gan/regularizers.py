"""Critic regularizers of the WGAN-GP mixin: a thin dispatch onto `lightning_gp.functional.gan`.

Every penalty's formula lives in the functional layer; this module only picks the function, wires in the
finite-difference variant and reads ‖∇D‖ at the penalty's points for logging. The constraints that are
not a loss term (weight clipping, spectral normalization) and the BatchNorm check live here too.
"""

from __future__ import annotations

import contextlib
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import spectral_norm

from lightning_gp.functional._autograd import linearised
from lightning_gp.functional._checks import check_choice
from lightning_gp.functional._layers import LINEAR_MAP_LAYERS, batch_norms
from lightning_gp.functional._recorder import GradNormRecorder
from lightning_gp.functional.gan import (
    difference_penalty,
    r1_penalty,
    r2_penalty,
    wgan_gradient_penalty,
    wgan_gradient_penalty_fd,
)
from lightning_gp.functional.gradients import per_sample_norm
from lightning_gp.functional.penalties import METHODS, Method, data_gradient_penalty_fd

#: The regularizers whose penalty is a gradient norm, so ``method`` applies to them.
GradientPenalty = Literal["gp", "gp_one_sided", "r1", "r2"]
#: The regularizers that add a penalty term (weighted by ``gp_weight``) to the critic loss.
Penalty = Literal[GradientPenalty, "difference"]
#: Every value ``regularizer=`` accepts.
Regularizer = Literal[Penalty, "weight_clipping", "spectral_normalization", "none"]
REGULARIZERS: tuple[str, ...] = get_args(Regularizer)
PENALTIES: tuple[str, ...] = get_args(Penalty)
GRADIENT_PENALTIES: tuple[str, ...] = get_args(GradientPenalty)
#: Layers that couple the samples of a batch (their output for one sample depends on the others).


class PenaltyTerm(NamedTuple):
    """One evaluation of a critic penalty.

    Attributes:
        value: the penalty's value (detached), what is logged as ``wgan/penalty``.
        loss: a scalar whose gradient w.r.t. the critic's parameters is ∇θ penalty: the penalty itself
            (double backward, difference), or the linear surrogate Σ⟨θ, ĝ⟩ (plus a constant: its value is the
            penalty's) with ĝ the finite-difference gradient. Adding it to the loss sends ĝ through the ordinary
            backward pass, so DDP all-reduces it like any other gradient (writing ĝ into ``.grad`` by hand would
            bypass DDP's hooks).
        grad_norm: mean ‖∇ₓD‖ at the points the penalty uses (None for the derivative-free penalty).
    """

    value: Tensor
    loss: Tensor
    grad_norm: Tensor | None


def _mean_input_grad_norm(recorder: GradNormRecorder | None) -> Tensor | None:
    """Mean ‖∇ₓD‖ at the points of the penalty, read off the recorder's first call whose input got a gradient.

    The functional penalties compute ∇ₓD(x̂) internally; the recorder's hooks see that gradient as ``autograd.grad``
    produces it, so the norm costs nothing extra and the penalty is not re-derived. Whether the functional layer
    differentiates Σᵢ Dᵢ, the mean or a scaled mean, the hook on the critic's output sees the seed sᵢ the backward
    starts from, and row i of the input gradient is sᵢ·∇ₓDᵢ (samples do not interact), so ∇ₓDᵢ comes out exactly.
    """
    if recorder is None:
        return None
    call = next((c for c in recorder.calls("") if 0 in c.input_grads and 0 in c.grads), None)
    if call is None:
        return None
    norms = per_sample_norm(call.input_grads[0].float())
    seed = call.grads[0].float().reshape(norms.shape[0], -1).sum(dim=1).abs()
    norms = torch.where(seed > 0, norms / torch.where(seed > 0, seed, torch.ones_like(seed)), norms)
    return norms.mean()


def critic_penalty(
    name: Penalty,
    critic: nn.Module,
    real: Tensor,
    fake: Tensor,
    *,
    method: Method = "double_backward",
    alpha: Tensor | None = None,
    alpha2: Tensor | None = None,
    track_grad_norm: bool = True,
) -> PenaltyTerm:
    """Evaluate the penalty ``name`` (one of `PENALTIES`) of ``critic`` on a real and a fake batch.

    Args:
        name: "gp", "gp_one_sided", "r1", "r2" or "difference".
        critic: the critic module (its parameters are what the penalty's gradient is taken for).
        real: the real batch; detached by the functional layer.
        fake: the generated batch, of the same shape; detached too.
        method: "double_backward" (exact) or "finite_difference" (no gradient of a gradient: works
            inside ``torch.compile``); ignored by "difference", which needs no input gradient at all.
        alpha: per-sample interpolation weights of x̂ (default: drawn U[0, 1]).
        alpha2: the second interpolates' weights, for "difference" only.
        track_grad_norm: record mean ‖∇ₓD‖ at the penalty's points (a recorder's hooks); off, ``grad_norm``
            is None.

    Example:


        >>> critic = torch.nn.Linear(2, 1)
        >>> term = critic_penalty("gp", critic, torch.randn(8, 2), torch.randn(8, 2))
        >>> torch.allclose(term.grad_norm, critic.weight.norm())
        True
    """
    track = track_grad_norm and name != "difference"  # the difference penalty takes no input gradient
    recorder = GradNormRecorder(critic, modules={"": critic}, input_grads=True) if track else None
    with recorder if recorder is not None else contextlib.nullcontext():
        term = _penalty_term(name, critic, real, fake, method=method, alpha=alpha, alpha2=alpha2)
    if name == "difference":  # no input gradient: nothing to report
        return term
    return PenaltyTerm(term.value, term.loss, _mean_input_grad_norm(recorder))


def _penalty_term(name: Penalty, critic: nn.Module, real: Tensor, fake: Tensor, *, method: Method,
                  alpha: Tensor | None, alpha2: Tensor | None) -> PenaltyTerm:
    if name == "difference":
        pair = None if alpha is None else (alpha, alpha2 if alpha2 is not None else torch.rand_like(alpha))
        penalty = difference_penalty(critic, real, fake, alpha=pair)
        return PenaltyTerm(penalty.detach(), penalty, None)
    if name not in GRADIENT_PENALTIES:
        raise ValueError(f"`regularizer` {name!r} adds no penalty term; penalties are {list(PENALTIES)}.")
    one_sided = name == "gp_one_sided"
    if method == "double_backward":
        if name == "r1":
            penalty = r1_penalty(critic, real)
        elif name == "r2":
            penalty = r2_penalty(critic, fake)
        else:
            penalty = wgan_gradient_penalty(critic, real, fake, alpha=alpha, one_sided=one_sided)
        return PenaltyTerm(penalty.detach(), penalty, None)
    check_choice(method, "method", METHODS)
    params = [p for p in critic.parameters() if p.requires_grad]
    if name in ("r1", "r2"):
        points = real if name == "r1" else fake
        res = data_gradient_penalty_fd(critic, points.detach(), params, power=2, center=0.0)
    else:
        res = wgan_gradient_penalty_fd(critic, real, fake, params, alpha=alpha, one_sided=one_sided)
    surrogate = linearised(res.penalty, list(zip(params, res.grads, strict=True)))
    return PenaltyTerm(res.penalty, surrogate, None)


def check_no_batch_norm(critic: nn.Module) -> None:
    """Raise if ``critic`` contains a layer that couples the samples of a batch.

    Example:


        >>> check_no_batch_norm(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4)))
        Traceback (most recent call last):
        ...
        ValueError: The critic's layer '1' is BatchNorm1d, ...
    """
    for layer_name, module in batch_norms(critic, training_only=False):
        raise ValueError(
            f"The critic's layer {layer_name or '<root>'!r} is {type(module).__name__}, which normalizes "
            "each sample with statistics of the whole batch. The gradient penalty is defined per sample "
            "(‖∇D(x̂ᵢ)‖ must depend on x̂ᵢ alone), and BatchNorm makes it depend on the other samples "
            "(Gulrajani et al. 2017, §4). Replace it by nn.LayerNorm or nn.InstanceNorm "
            "(e.g. nn.GroupNorm(1, C) as a LayerNorm for conv features), or drop it."
        )


def apply_spectral_normalization(critic: nn.Module) -> list[str]:
    """Register PyTorch's spectral-norm parametrization on every Linear/Conv ``weight`` of ``critic``.

    Layers already parametrized are left alone, so calling it twice is harmless. Returns the names of
    the layers it registered on (in place; the parameters stay the same objects, now under
    ``parametrizations.weight.original``, so build the optimizers afterwards).

    Example:


        >>> critic = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        >>> apply_spectral_normalization(critic)
        ['0', '2']
    """
    names = []
    for layer_name, module in critic.named_modules():
        if isinstance(module, LINEAR_MAP_LAYERS) and getattr(module, "weight", None) is not None:
            if parametrize.is_parametrized(module, "weight"):
                continue
            spectral_norm(module)
            names.append(layer_name)
    if not names and not any(parametrize.is_parametrized(m) for m in critic.modules()):
        raise ValueError(
            "regularizer='spectral_normalization' found no nn.Linear or nn.Conv layer with a weight in the "
            "critic to normalize. Build the critic from those layers, or pick another regularizer."
        )
    return names


@torch.no_grad()
def clip_weights_(critic: nn.Module, clip_value: float) -> None:
    """Clamp every parameter of ``critic`` into [−clip_value, clip_value] in place (the original WGAN).

    Example:


        >>> critic = torch.nn.Linear(2, 1)
        >>> clip_weights_(critic, 0.01)
        >>> bool(critic.weight.abs().max() <= 0.01)
        True
    """
    for p in critic.parameters():
        p.clamp_(-clip_value, clip_value)
