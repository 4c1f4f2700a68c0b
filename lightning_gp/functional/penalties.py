"""Data- and parameter-gradient penalties, by double backprop and by finite differences.

Per-sample values fᵢ = f(xᵢ; θ), gᵢ = ∇ₓfᵢ, φ(n) = (n − c)ᵖ (or max(0, n − c)ᵖ one-sided). Why the
finite-difference versions exist, their step sizes and their error: ``docs/design/finite-differences.md``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from lightning_gp.functional._autograd import (
    EXPLICIT_METHODS,
    Displacement,
    ExplicitMethod,
    displaced,
    finite_difference_term,
    linearised,
    linearised_now,
)
from lightning_gp.functional._autograd import grad as autograd_grad
from lightning_gp.functional._checks import (
    as_param_list,
    check_batched,
    check_callable,
    check_finite,
    check_floating_input,
    check_non_empty_batch,
    check_penalty_shape,
    check_per_sample,
    check_scalar,
    grads_or_zeros,
)
from lightning_gp.functional._rng import RNGState, replayed_rng
from lightning_gp.functional._state import CALLED, restored_buffers
from lightning_gp.functional.gradients import (
    input_gradient,
    per_sample_squared_norm,
    safe_sqrt,
    squared_norm_sum,
    squared_norms,
)
from lightning_gp.functional.precision import compute_dtype, default_step

Params = nn.Module | Iterable[Tensor] | Tensor
#: How a penalty's parameter gradient is computed: exactly (double backprop) or by finite differences.
Method = ExplicitMethod  # the functional penalties take no "auto": the callbacks resolve it (_autograd.agreed_method)
METHODS = EXPLICIT_METHODS

#: Whose buffers a difference's second pass puts back: a module's, those of every module it runs (``CALLED``), or
#: none (None: the caller's pass restores the module's state itself, as the callbacks' extra passes do).
BufferOwner = nn.Module | Literal["called"] | None


class PenaltyGradient(NamedTuple):
    """Result of a finite-difference penalty.

    Attributes:
        penalty: the penalty's value (detached scalar).
        grads: ≈ ∇θ penalty, one tensor per parameter (no double backward involved).
        output: the per-sample outputs (or the scalar loss) at the unperturbed point, detached.
        output_grads: ∇θ of ``output.mean()`` (data penalty) or of the loss (parameter penalty), the
            gradient ordinary training needs, computed on the way for free.
    """

    penalty: Tensor
    grads: tuple[Tensor, ...]
    output: Tensor
    output_grads: tuple[Tensor, ...]


def gradient_norm_penalty(
    grad: Tensor, *, power: float = 2, center: float = 0.0, one_sided: bool = False
) -> Tensor:
    """Per-sample φ(‖gradᵢ‖) = (‖gradᵢ‖ − center)^power, or max(0, ‖gradᵢ‖ − center)^power.

    Shape (B,). Finite derivatives everywhere, also at ``grad = 0`` (a dead-ReLU sample).

    Example:


        >>> gradient_norm_penalty(torch.tensor([[3.0, 4.0]]), center=1.0)
        tensor([16.])
    """
    check_penalty_shape(power, center, one_sided)
    check_batched(grad, "t")  # the name `per_sample_norm`'s message has always used here
    check_floating_input(grad, "grad", requires_grad=False)
    sq = squared_norms(grad)  # float32 for half grads: no overflow of the squares
    if center == 0:
        # ‖g‖ᵖ = (‖g‖²)^(p/2): for p = 2 this is the smooth sum of squares, no square root at all.
        if power == 2:
            return sq.to(grad.dtype)
        zero = sq == 0  # only an exact 0 takes the zero branch: NaN stays NaN
        safe = torch.where(zero, torch.ones_like(sq), sq)
        return torch.where(zero, torch.zeros_like(sq), safe.pow(power / 2)).to(grad.dtype)
    gap = safe_sqrt(sq) - center
    if one_sided:
        gap = gap.clamp_min(0)  # clamp keeps NaN
    return (gap.abs().pow(power) if power != 2 else gap.square()).to(grad.dtype)


def _step(step: object, kind: str, like: Tensor | None) -> float:
    """``step``, checked, or the package's default for ``kind`` in the dtype ``like`` computes in (autocast too)."""
    if step is None:
        return default_step(kind, compute_dtype(like))
    return check_finite(step, "step", strict=True, hint="Use a small relative step such as 1e-2 (data) or 1e-3 "
                        "(parameters), or None for the default of the compute dtype; the difference quotient's "
                        "error is first order in it.")


def _rng_state(*tensors: Tensor) -> RNGState:
    """The random state of every device the tensors live on (the CPU generator always included)."""
    return RNGState.capture(*{t.device for t in tensors})


def data_gradient_penalty(
    output: Tensor,
    inputs: Tensor,
    *,
    power: float = 2,
    center: float = 0.0,
    one_sided: bool = False,
) -> Tensor:
    """Mean over samples of φ(‖∇ₓ outputᵢ‖), differentiable w.r.t. the parameters (double backprop).

    ``power=1`` is the ε‖∇ₓℓ‖ form (first-order FGSM adversarial training), ``power=2`` the classic
    double backpropagation λ‖∇ₓℓ‖², ``power=2, center=1`` the WGAN-GP penalty.

    Args:
        output: per-sample values, shape (B,) or (B, 1), computed from ``inputs``.
        inputs: the batch, ``requires_grad=True``.
        power: p ≥ 1 of φ (see `gradient_norm_penalty`).
        center: c ≥ 0 of φ.
        one_sided: use max(0, ‖gᵢ‖ − c)ᵖ, penalising only norms above ``center``.

    Example:


        >>> model = torch.nn.Linear(3, 1)
        >>> x = torch.randn(8, 3, requires_grad=True)
        >>> penalty = data_gradient_penalty(model(x), x)
        >>> torch.allclose(penalty, model.weight.square().sum())
        True
    """
    check_penalty_shape(power, center, one_sided)
    check_floating_input(inputs, "inputs", requires_grad=True)
    check_non_empty_batch(inputs, "inputs", "data_gradient_penalty")
    output = check_per_sample(output, inputs.shape[0], "output")
    grad = input_gradient(output, inputs, create_graph=True)
    penalty = gradient_norm_penalty(grad, power=power, center=center, one_sided=one_sided).mean()
    return penalty + _nan_if_nonfinite(output)


def _nan_if_nonfinite(values: Tensor) -> Tensor:
    """0, or NaN when ``values`` hold a NaN or inf, detached: a NaN sample whose input gradient autograd reports as
    finite (ReLU's backward maps NaN to 0) still shows in the penalty's value. One small sum, no host sync."""
    return values.detach().sum() * 0


def parameter_gradient_penalty(loss: Tensor, params: Params) -> Tensor:
    """‖∇θ loss‖², differentiable (double backprop).

    With ``loss`` the batch loss L and gradient descent at learning rate γ, adding (γ/4)·‖∇θL‖²
    cancels the leading discretisation error of the step (implicit gradient regularization).

    Example:


        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> parameter_gradient_penalty((w**2).sum(), [w])  # ∇ = 2w, ‖∇‖² = 20
        tensor(20., grad_fn=<AddBackward0>)
    """
    loss = check_scalar(loss, "loss")
    params = as_param_list(params)
    if not loss.requires_grad:
        raise ValueError("`loss` does not depend on `params` (it has no autograd graph).")
    grads = autograd_grad(loss, params, create_graph=True, allow_unused=True)
    grads = grads_or_zeros(grads, params, what="`loss`", wrt="params")
    return squared_norm_sum(grads)


def data_gradient_penalty_fd(
    fn: Callable[[Tensor], Tensor],
    inputs: Tensor,
    params: Params,
    *,
    power: float = 2,
    center: float = 0.0,
    one_sided: bool = False,
    step: float | None = None,
) -> PenaltyGradient:
    """The data-gradient penalty and ≈ its parameter gradient, with no double backward.

    Two ordinary forward/backward passes: one at ``inputs`` (giving gᵢ and ∇θ fᵢ), one at
    ``inputs + h·d`` with dᵢ = ∂φ/∂gᵢ. Works inside ``torch.compile``d models and through fused
    ``scaled_dot_product_attention``, where `data_gradient_penalty` raises.

    Step size: h is chosen so that the sample moved furthest moves by ``step`` times the RMS
    per-sample norm of ``inputs`` (or by ``step`` itself for all-zero inputs). The error is first
    order in ``step``; the default, 1e-2 in float32 (cosine > 0.999 against double backprop on smooth models),
    follows the dtype the passes compute in (``precision.default_step``: 0.039 under bfloat16 autocast).
    Piecewise-linear models (ReLU) are exact unless the step crosses a kink.

    Args:
        fn: maps a batch to per-sample values, shape (B,) or (B, 1). Called twice, with the same dropout masks.
        inputs: the batch (floating point); it is detached, not modified.
        params: the parameters (a module or tensors) to differentiate. What the second pass changes in buffers
            (BatchNorm statistics) is put back: the module's, or those of every module ``fn`` runs.
        power: p ≥ 1 of φ, as in `data_gradient_penalty`.
        center: c ≥ 0 of φ.
        one_sided: penalise only norms above ``center``.
        step: relative input displacement of the difference quotient (None: the compute dtype's default).

    Example:


        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> res = data_gradient_penalty_fd(model, torch.randn(16, 3), model)
        >>> len(res.grads) == len(list(model.parameters()))
        True
    """
    check_penalty_shape(power, center, one_sided)
    if step is not None:
        _step(step, "input", None)  # a bad step is named before the other arguments are looked at
    check_callable(fn, "fn", "a callable mapping a batch to per-sample values")
    check_floating_input(inputs, "inputs", requires_grad=False)
    check_non_empty_batch(inputs, "inputs", "data_gradient_penalty_fd")
    step = _step(step, "input", inputs)
    # the second pass's BatchNorm statistics put back: the module's, or, given tensors, those of what `fn` runs
    module, params = (params if isinstance(params, nn.Module) else CALLED), as_param_list(params)
    x = inputs.detach().requires_grad_(True)
    batch = x.shape[0]
    rng = _rng_state(x, *params)  # the second pass replays the first's dropout masks
    out = check_per_sample(fn(x), batch, "fn(inputs)")
    # Differentiate the *mean*: its parameter gradient is the one training needs, with no extra pass
    # over the parameters to rescale it; the per-sample input gradients are then B·∇ₓmean.
    first = torch.autograd.grad(out.mean(), [x, *params], allow_unused=True)
    if first[0] is None:
        raise ValueError("`fn(inputs)` does not depend on `inputs`: autograd found no path between them.")
    base = grads_or_zeros(first[1:], params, what="`fn(inputs)`", wrt="params")

    phi, direction = finite_difference_direction(first[0] * batch, power=power, center=center, one_sided=one_sided)

    h = finite_difference_input_step(x.detach(), direction, step)

    def mean_at(delta: Tensor) -> Tensor:
        with second_pass(rng, module):
            out2 = check_per_sample(fn(x.detach() + delta), batch, "fn(inputs)")
        if not out2.requires_grad:
            raise ValueError("`fn(inputs)` does not depend on `params` (it has no autograd graph).")
        return out2.mean()

    # (∇θ mean f(x + h d) − ∇θ mean f(x)) / h, the base gradient entering through the linearised mean
    base_mean = linearised(out.mean(), list(zip(params, base, strict=True)))
    term = input_difference(mean_at, h * direction, base_mean, h=h)
    second = torch.autograd.grad(term, params, allow_unused=True)
    grads = tuple(grads_or_zeros(second, params, what="`fn(inputs)`", wrt="params"))
    penalty = phi.detach().mean() + _nan_if_nonfinite(out)
    return PenaltyGradient(penalty=penalty, grads=grads, output=out.detach(), output_grads=tuple(base))


def finite_difference_direction(
    grad: Tensor, *, power: float = 2, center: float = 0.0, one_sided: bool = False
) -> tuple[Tensor, Tensor]:
    """φ(‖gradᵢ‖) per sample (detached) and the direction dᵢ = ∂φ/∂gradᵢ, held fixed in the difference."""
    with torch.enable_grad():
        g = grad.detach().requires_grad_(True)
        phi = gradient_norm_penalty(g, power=power, center=center, one_sided=one_sided)
        (direction,) = torch.autograd.grad(phi.sum(), g)
    return phi.detach(), direction


def finite_difference_input_step(inputs: Tensor, direction: Tensor, step: float) -> float:
    """The h of x + h·d: the sample moved furthest moves by ``step`` × the RMS per-sample norm of x.

    Returns 0.0 when ``direction`` is zero everywhere (nothing to difference). Making the step relative
    to the inputs' scale keeps the same ``step`` meaningful for pixels in [0, 1] and for standardized
    features alike; all-zero inputs fall back to an absolute step.
    """
    return finite_difference_input_step_from_norms(squared_norms(inputs).mean(), squared_norms(direction).max(), step)


def finite_difference_input_step_from_norms(
    mean_squared_input_norm: Tensor, max_squared_direction_norm: Tensor, step: float
) -> float:
    """`finite_difference_input_step` from the two batch statistics it needs.

    The callbacks use this under DDP: they all-reduce the mean of ‖xᵢ‖² and the max of ‖dᵢ‖² first, so
    every rank takes the same h as one process on the combined batch.
    """
    largest = float(max_squared_direction_norm.sqrt())
    if largest == 0:
        return 0.0
    scale = float(mean_squared_input_norm.sqrt())
    return step * (scale if scale > 0 else 1.0) / largest


def input_step_statistics(inputs: Tensor, direction: Tensor) -> Tensor:
    """The statistics h depends on, (Σᵢ‖xᵢ‖², B, maxᵢ‖dᵢ‖²) in float32: gathered over DDP ranks, they give every rank
    the h of one process on the combined batch (:func:`input_step_from_statistics`)."""
    sq = per_sample_squared_norm(inputs)
    return torch.stack([sq.sum().float(), torch.tensor(float(inputs.shape[0]), device=sq.device),
                        per_sample_squared_norm(direction).max().float()])


def input_step_from_statistics(statistics: Tensor, step: float) -> float:
    """:func:`finite_difference_input_step` from the (R, 3) statistics of R ranks (:func:`input_step_statistics`).

    Example:


        >>> x, d = torch.ones(4, 3), torch.ones(4, 3)
        >>> stats = input_step_statistics(x, d)
        >>> input_step_from_statistics(stats[None], 0.01) == finite_difference_input_step(x, d, 0.01)
        True
    """
    mean_sq = statistics[:, 0].sum() / statistics[:, 1].sum()
    return finite_difference_input_step_from_norms(mean_sq, statistics[:, 2].max(), step)


def finite_difference_parameter_step(params: list[Tensor], grad_norm: Tensor, step: float) -> float:
    """The h of θ + h·g: θ moves by ``step`` × ‖θ‖ (SAM's radius, relative to the model's scale).

    ``grad_norm`` is ‖g‖ > 0; an all-zero θ falls back to an absolute step.
    """
    theta_norm = squared_norm_sum([p.detach() for p in params]).sqrt()
    return float(step * (theta_norm if theta_norm > 0 else 1.0) / grad_norm)


def input_difference(
    loss_at: Callable[[Tensor], Tensor], displacement: Tensor, base: Tensor, *, h: float, scale: float = 1.0,
) -> Tensor:
    """The input-side difference quotient, as a term of value 0 whose gradient is (scale/h)·(∇L(x + h·d) − ∇base).

    The one finite-difference term of the data penalties (functional, callback and mixin alike). ``loss_at(δ)``
    is the loss with the input moved by δ = ``displacement`` = h·d (the caller's only copy of it: d itself may be
    freed before the pass), a pass that isolates itself (the first pass's dropout masks, the
    module's state put back: :func:`second_pass` here, ``StepContext.extra_loss`` in a callback); its gradient is
    taken at once (:func:`linearised_now`). ``h = 0`` (φ flat at every sample) gives a zero term; a NaN ``h`` a NaN one.
    """
    if h == 0:
        return base * 0
    at = linearised_now(loss_at(displacement))
    return finite_difference_term(at, base, step=h, scale=scale)


def parameter_step_size(params: list[Tensor], grad_norm: Tensor, step: float) -> float:
    """The h of θ + h·g for a finite difference (:func:`finite_difference_parameter_step`), with the degenerate
    cases the difference must not hide: 0.0 for ‖g‖ = 0 (L is flat along g), NaN for a non-finite ‖g‖.
    One host read."""
    norm = float(grad_norm)
    if norm == 0 or not math.isfinite(norm):
        return 0.0 if norm == 0 else math.nan
    return finite_difference_parameter_step(params, grad_norm, step)


def parameter_difference(
    loss_at: Callable[[], Tensor], params: list[Tensor], direction: list[Tensor], base: Tensor, *, h: float,
    scale: float = 2.0,
) -> tuple[Tensor, Tensor]:
    """The parameter-side difference, as a term of value 0 whose gradient is (scale/h)·(∇L(θ + h·d) − ∇base), and
    the loss at θ + h·d (detached).

    The one parameter displacement of the package: the parameter penalty's finite difference (d = g, scale 2)
    and SAM's ascent step (d = g or θ²⊙g, scale = h: the gradient becomes ∇L(θ + ε)). θ moves in place by h·d,
    ties and aliases intact, and comes back bit for bit (:func:`displaced`); ``loss_at()``'s gradient is taken
    while θ is moved (``loss_at`` is a pass that isolates itself, as in :func:`input_difference`).
    ``h = 0`` gives a zero term and no pass; a NaN ``h`` (a non-finite gradient) a NaN term, never a dropped one.
    """
    if h == 0:
        return base * 0, base.detach()
    if not math.isfinite(h):
        return base * math.nan, base.detach() * math.nan
    at = displaced_linearisation(loss_at, params, direction, h=h)
    return finite_difference_term(at, base, step=h, scale=scale), at.detach()


def displaced_linearisation(
    loss_at: Callable[[], Tensor], params: list[Tensor], direction: list[Tensor], *, h: float,
) -> Tensor:
    """The loss at θ + h·d, linearised: its value, and its gradient taken while θ is moved in place (θ put back
    bit for bit after). The pass inside :func:`parameter_difference`, and SAM's whole objective when nothing else
    needs the clean gradient."""
    with displaced(params, [d.detach() for d in direction], h):
        return linearised_now(loss_at())


def displaced_loss(
    loss_at: Callable[[], Tensor], params: list[Tensor], direction: list[Tensor], *, h: float,
    owner: nn.Module | None = None,
) -> tuple[Tensor, Displacement]:
    """The loss at θ + h·d with its graph, for a backward that runs later: SAM's objective when the step's own
    backward (Lightning's) is the one to differentiate it, as in a hand-written two-pass loop.

    θ stays at θ + h·d after this returns: the graph saved it, and its backward must see it. The caller calls
    ``restore()`` on the returned :class:`Displacement` once that backward is over, and wherever one may not come
    (an exception, a skipped step). With ``owner`` (the module whose parameters and buffers are every tensor the pass
    reads), parameters alone on their storage are displaced by a storage swap (:class:`Displacement`). A ``direction``
    list is emptied once θ has moved, so a caller that holds no other reference to it frees it before the pass, as
    the reference implementation frees g before its second forward.
    """
    displacement = Displacement(params, [d.detach() for d in direction], h, owner=owner)
    if isinstance(direction, list):
        direction.clear()
    try:
        loss = loss_at()  # a pass that isolates itself (SAM's extra pass)
    except BaseException:
        displacement.restore()
        raise
    return loss, displacement


@contextlib.contextmanager
def second_pass(rng: RNGState, module: BufferOwner) -> Iterator[None]:
    """The isolation of a plain-PyTorch difference's second pass (the functional penalties' own; a callback's pass
    is ``StepContext.extra_loss``): the first pass's random state ``rng`` replayed, ``module``'s buffers put back
    after (:data:`~lightning_gp.functional._state.CALLED`: those of every module the pass runs)."""
    with replayed_rng(rng), restored_buffers(module):
        yield


def parameter_gradient_penalty_fd(
    loss_fn: Callable[[], Tensor], params: Params, *, step: float | None = None
) -> PenaltyGradient:
    """‖∇θL‖² and ≈ its gradient 2·H·∇θL, with no double backward (the GNP / SAM two-pass scheme).

    ``loss_fn()`` is evaluated at θ and at θ + h·g with g = ∇θL; the parameters are restored exactly
    (from a copy, not by subtraction) before returning, also when ``loss_fn`` raises.

    Step size: the parameters move by ``step`` times their global norm, i.e. h = step·‖θ‖/‖g‖
    (SAM's radius, made relative so it does not depend on the model's scale).

    Args:
        loss_fn: recomputes the scalar loss from the current parameter values. Called twice, with the same
            random state (dropout masks) both times.
        params: the parameters (a module or tensors); the second pass's buffer updates are put back (the module's,
            or those of every module ``loss_fn`` runs).
        step: relative parameter displacement of the difference quotient (None: the compute dtype's default, 1e-3
            in float32, ε in a less precise one: ``precision.default_step``).

    Example:


        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> res = parameter_gradient_penalty_fd(lambda: (w**2).sum(), [w])  # H = 2I, ∇‖g‖² = 8w
        >>> torch.allclose(res.grads[0], 8 * w.detach(), rtol=1e-3)
        True
    """
    check_callable(loss_fn, "loss_fn", "a callable mapping nothing to the scalar loss (a closure over the batch)")
    # the second pass's BatchNorm statistics put back: the module's, or, given tensors, those of what `loss_fn` runs
    module, params = (params if isinstance(params, nn.Module) else CALLED), as_param_list(params)
    step = _step(step, "parameter", params[0] if params else torch.zeros(()))
    rng = _rng_state(*params)  # the second pass replays the first's dropout masks
    loss = check_scalar(loss_fn(), "loss_fn()")
    if not loss.requires_grad:
        raise ValueError("`loss_fn()` does not depend on `params` (it has no autograd graph).")
    g = grads_or_zeros(
        torch.autograd.grad(loss, params, allow_unused=True), params, what="`loss_fn()`", wrt="params"
    )
    g_sq = squared_norm_sum(g)

    def loss_at() -> Tensor:
        with second_pass(rng, module):
            loss2 = check_scalar(loss_fn(), "loss_fn()")
        if not loss2.requires_grad:
            raise ValueError("`loss_fn()` does not depend on `params` (it has no autograd graph).")
        return loss2

    # 2·(∇θL(θ + h g) − ∇θL(θ)) / h, ∇θL(θ) entering through the linearised loss
    base = linearised(loss, list(zip(params, g, strict=True)))
    h = parameter_step_size(params, g_sq.sqrt(), step)
    term, _ = parameter_difference(loss_at, params, g, base, h=h)
    g2 = torch.autograd.grad(term, params, allow_unused=True)
    grads = tuple(grads_or_zeros(g2, params, what="`loss_fn()`", wrt="params"))
    return PenaltyGradient(g_sq.detach(), grads, loss.detach(), tuple(g))
