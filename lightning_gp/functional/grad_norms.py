"""Exact per-sample gradient norms ‖∇ₓfᵢ‖ and ‖∇θfᵢ‖ from one forward and one backward pass.

The per-sample gradient of a Linear layer is an outer product, ∇_W fᵢ = gᵢ hᵢᵀ (g: gradient of fᵢ at the
layer's output, h: the layer's input), so its norm is ‖gᵢ‖·‖hᵢ‖ and never has to be materialised (the
"ghost norm" of BackPACK's ``BatchL2Grad`` and Opacus' ghost clipping). With a sequence dimension the
gradient is a sum of outer products, ‖Σₜ gₜhₜᵀ‖² = Σₜ,ₛ (gₜ·gₛ)(hₜ·hₛ). Convolutions, LayerNorm/GroupNorm/
RMSNorm, Embedding and MultiheadAttention have closed forms too (``_norm_rules``, each choosing its
cheapest exact form from the shapes). Any other layer with parameters gets its exact per-sample gradient
from ``torch.func`` (vmap of grad over that layer alone, fed with the layer's recorded inputs and output
gradients), which costs one small per-sample backward of that layer only.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_gp.functional._checks import check_batched, check_bool, check_callable, check_per_sample
from lightning_gp.functional._exact_route import (
    STRUCTURES,
    exact_squared_norms,
    unbatched_units,
    unit_named,
    unit_params,
)
from lightning_gp.functional._layer_call import layer_label
from lightning_gp.functional._norm_rules import UnbatchedLayer, linear_squared_norms
from lightning_gp.functional._param_units import closed_form_modules, own_params
from lightning_gp.functional._recorder import GradNormRecorder
from lightning_gp.functional.gradients import accumulation_dtype

__all__ = ["GradNormRecorder", "PerSampleGradNorms", "linear_squared_norms", "per_sample_grad_norms",
           "per_sample_grad_norms_by_layer", "per_sample_grad_norms_of_loss"]


class PerSampleGradNorms(NamedTuple):
    """Result of `per_sample_grad_norms_by_layer`.

    Attributes:
        input_norms: ‖∇ₓfᵢ‖, shape (B,); NaN when ``inputs`` are not floating point (token ids).
        param_norms: ‖∇θfᵢ‖ over all parameters with ``requires_grad=True``, shape (B,).
        layer_squared_norms: per-sample squared norm of each module's own trainable parameters, keyed by
            the module's name in ``model.named_modules()`` (``"_root"`` for the model itself), each (B,).
            Their sum over keys is ``param_norms ** 2``.
        values: the per-sample values fᵢ returned by ``loss_fn``, detached, shape (B,).
    """

    input_norms: Tensor
    param_norms: Tensor
    layer_squared_norms: dict[str, Tensor]
    values: Tensor


def per_sample_grad_norms_by_layer(
    model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor], *, input_norms: bool = True,
    forward: Callable[[Tensor], object] | None = None,
) -> PerSampleGradNorms:
    """Per-sample ‖∇ₓfᵢ‖, ‖∇θfᵢ‖ and each layer's share, exactly, from one forward and one backward.

    fᵢ = ``loss_fn(model(inputs))[i]``. Linear, Conv1d/2d/3d, LayerNorm, GroupNorm, RMSNorm, Embedding and
    MultiheadAttention layers use closed forms (no per-sample gradient of the model is built); any other
    module owning trainable parameters, and any parameter used outside its own module's forward, is
    handled exactly by ``torch.func`` over the nearest enclosing module that ran. A parameter shared by
    several modules (tied weights) counts once, under the first of them in ``named_modules()``. Samples
    must not interact (no BatchNorm in training mode) and layers must keep the batch in dimension 0 (or 1
    for modules with ``batch_first=False``).

    Nothing is left behind: no ``.grad`` is written, ``requires_grad`` is unchanged, hooks are removed
    even when ``loss_fn`` raises. The model runs in its current mode (train/eval); twice when a layer's
    parameters are used outside its own forward (the second time with every module recorded).

    Args:
        model: any ``nn.Module`` called as ``model(inputs)``.
        inputs: batch of shape (B, ...); need not require grad (a detached copy is differentiated).
        loss_fn: maps the model's output to per-sample values fᵢ of shape (B,) (or (B, 1)).
        input_norms: also ‖∇ₓfᵢ‖ (float inputs); False skips the input gradient, whose cost through a first
            convolution is a sizeable part of a step ([Benchmarks](../benchmarks.md)), and gives NaN input norms.

    Example:


        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        >>> r = per_sample_grad_norms_by_layer(model, torch.randn(5, 3), lambda out: out[:, 0])
        >>> sorted(r.layer_squared_norms), r.param_norms.shape
        (['0', '2'], torch.Size([5]))
    """
    check_batched(inputs, "inputs")
    input_norms = check_bool(input_norms, "input_norms")
    modules = dict(model.named_modules())
    if inputs.shape[0] == 0:  # an empty batch has empty norms; the model is not run
        empty = inputs.new_zeros(0, dtype=inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype())
        layers = {layer_label(n): empty for n, m in modules.items() if own_params(m)}
        return PerSampleGradNorms(empty, empty, layers, empty)
    # Hook only the layers with parameters when all have a closed form; if one of them did not run (its
    # parameters may be used by another module's forward), measure again with every module hooked.
    restricted = closed_form_modules(modules)
    if forward is not None:
        check_callable(forward, "forward", "callable (inputs) -> outputs")
    forward = model if forward is None else forward
    result = _measure(model, inputs, loss_fn, restricted, input_norms, forward) if restricted is not None else None
    return result if result is not None else _measure(model, inputs, loss_fn, None, input_norms, forward)


def _measure(model: nn.Module, inputs: Tensor, loss_fn: Callable, modules: dict | None,
             input_norms: bool, forward: Callable) -> PerSampleGradNorms | None:
    """One forward and backward with ``modules`` hooked (all when None); None when a hooked layer did not run.

    Layers whose calls do not keep the samples apart along their batch dimension (checked from the gradient
    of one sample's value, see :func:`unbatched_units`), and layers ``torch.func`` cannot replay (recurrent
    layers, data-dependent control flow), are measured exactly by :func:`exact_squared_norms` instead.
    """
    batch = inputs.shape[0]
    floating = inputs.is_floating_point() and input_norms
    x = inputs.detach().requires_grad_(True) if floating else inputs
    recorder = GradNormRecorder(model, batch, modules=modules)
    key = (tuple(inputs.shape), inputs.dtype, floating, tuple(recorder.modules))
    known = STRUCTURES.setdefault(model, {})
    with recorder:
        structure = known.get(key)  # (units for the exact route, does the input mix samples?, all outputs?)
        if structure is not None and not (structure[0] or structure[1] or structure[2]):
            recorder.keep_outputs_of_sources_only()  # nothing will read the other outputs: free them in the forward
        with torch.enable_grad():
            values = check_per_sample(loss_fn(forward(x)), batch, "loss_fn(outputs)")
        if not values.requires_grad:
            raise ValueError(
                "`loss_fn(outputs)` does not depend on the model's parameters or inputs (no autograd graph); "
                "do not call this under `torch.no_grad()`."
            )
        if modules is not None and recorder.not_run():
            return None
        first = structure is None
        if first:  # once per model and input shape, before the step's backward: about half a backward
            with recorder.paused():  # the probe's gradients are not the step's
                unbatched, coupled = unbatched_units(recorder, values, x if floating else None)
            structure = known[key] = (set(unbatched), coupled, False)
        exact_units, coupled, every_output = structure
        # the graph, for the exact route (also on the first call, where a layer torch.func cannot replay may join
        # it: measuring again would draw new dropout masks)
        keep = first or bool(exact_units) or coupled
        # Each layer is measured in the backward as soon as its gradients are in, and its records dropped then.
        # The gradients come from the recorder's tensor hooks, which stay right when a later op
        # (ReLU(inplace=True)) overwrites an output in place. The backward's targets only make it reach every
        # layer: x and the outputs of the layers fed by no differentiable input, from which every other layer
        # lies on the way back where that holds (checked below), else every layer output: what autograd returns
        # for its targets lives to the end of the backward, so few targets keep the memory down.
        recorder.compute_eagerly(batch, frozenset(unit_params(recorder, exact_units)))
        targets = ([x] if floating else []) + (recorder.outputs() if every_output else recorder.source_outputs())
        grads = torch.autograd.grad(values.sum(), targets, allow_unused=True, retain_graph=keep)
        unreached, retry = recorder.unreached(), False  # layers off the way back to the sources, or unused
        if unreached and not every_output:
            known[key] = (exact_units, coupled, True)  # from now on every layer output is a target
            if keep:  # nothing was dropped: every unreached output is at hand
                torch.autograd.grad(values.sum(), unreached, allow_unused=True, retain_graph=True)
            else:
                retry = True  # the graph is gone
    if retry:
        return _measure(model, inputs, loss_fn, modules, input_norms, forward)
    while True:  # units the closed forms and torch.func cannot take join the exact route (and are remembered)
        skip = unit_params(recorder, exact_units)
        try:
            layer = recorder.layer_squared_norms(batch, skip=frozenset(skip))
            break
        except UnbatchedLayer as err:
            unit = unit_named(recorder, err.unit)
            if unit is None or unit in exact_units:
                raise
            exact_units.add(unit)
            if not keep:  # the graph is gone: measure again, now keeping it for the exact route
                return _measure(model, inputs, loss_fn, modules, input_norms, forward)
    if skip or coupled:
        extra, x_sq = exact_squared_norms(values, recorder, skip, x if floating and coupled else None)
        for label, sq in extra.items():
            layer[label] = layer[label] + sq if label in layer else sq
    x_norms = (
        grads[0].reshape(batch, -1).norm(dim=1)
        if floating and grads[0] is not None
        else torch.full((batch,), math.nan if not floating else 0.0, device=inputs.device)
    )
    if floating and coupled:
        x_norms = x_sq.sqrt()
    zero = torch.zeros(batch, dtype=values.dtype, device=values.device)
    param_sq = sum(layer.values(), zero)
    return PerSampleGradNorms(x_norms, param_sq.sqrt(), layer, values.detach())


def per_sample_grad_norms(
    model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor], *, input_norms: bool = True
) -> tuple[Tensor, Tensor]:
    """Per-sample ‖∇ₓfᵢ‖ and ‖∇θfᵢ‖, each of shape (B,), exactly and without per-sample gradients.

    A shortcut for `per_sample_grad_norms_by_layer` (see there for what is supported); use that one
    for each layer's share.

    Args:
        model: any ``nn.Module`` called as ``model(inputs)``.
        inputs: batch of shape (B, ...); need not require grad.
        loss_fn: maps the model's output to per-sample values fᵢ of shape (B,).
        input_norms: False skips ‖∇ₓfᵢ‖ (NaN then), when only ‖∇θfᵢ‖ is wanted.

    Example:


        >>> model = nn.Linear(3, 1)
        >>> x = torch.randn(4, 3)
        >>> input_norms, param_norms = per_sample_grad_norms(model, x, lambda out: out[:, 0])
        >>> torch.allclose(input_norms, model.weight.norm().expand(4))  # ∇ₓ(wᵀx + b) = w
        True
        >>> torch.allclose(param_norms, (x.square().sum(1) + 1).sqrt())  # ∇_(w,b) = (x, 1)
        True
    """
    r = per_sample_grad_norms_by_layer(model, inputs, loss_fn, input_norms=input_norms)
    return r.input_norms, r.param_norms


#: Models whose recording must hook every module (see :func:`per_sample_grad_norms_of_loss`).
_RECORD_ALL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: How a scalar loss reduces the per-sample losses: L = (1/B)·Σℓᵢ ("mean") or L = Σℓᵢ ("sum").
LOSS_REDUCTIONS = ("mean", "sum")


def per_sample_grad_norms_of_loss(
    model: nn.Module, loss_fn: Callable[[], Tensor], batch: int, *, wrt: Tensor | Callable[[], Tensor] | None = None,
    reduction: str = "mean", batch_tensors: list[Tensor] | None = None,
) -> PerSampleGradNorms:
    """Per-sample ‖∇ℓᵢ‖ of a *scalar* loss over a batch, L = mean ℓᵢ (or Σℓᵢ), from one forward and one backward.

    ``loss_fn()`` runs ``model`` on a batch of ``batch`` samples however it likes (masks, several inputs, a
    model's own loss) and returns L. Samples must not interact, so each layer's output gradient is row by row that
    of (1/B)·ℓᵢ, and the ghost norms of :func:`per_sample_grad_norms_by_layer` give ‖∇θℓᵢ‖ (times B for a mean).
    A Hugging Face LM's mean over the batch's tokens is (1/B)·Σℓᵢ with ℓᵢ sample i's share times B. A layer that
    mixes samples (a (T, T) position bias, a (B·T, D) flattened input) raises ``ValueError`` naming it: use
    :func:`per_sample_grad_norms_by_layer` with per-sample values there.

    Args:
        model: the module whose trainable parameters are measured (its calls inside ``loss_fn`` are recorded).
        loss_fn: ``() -> L``, a scalar.
        batch: the number of samples B.
        wrt: a (B, ...) tensor that requires grad and that the loss uses (the input, a δ on a layer's output), or a
            function returning it, called after ``loss_fn``: ‖∇ℓᵢ‖ w.r.t. it as ``input_norms`` (else NaN).
        reduction: ``"mean"`` or ``"sum"``, how L reduces the ℓᵢ.
        batch_tensors: the batch's tensors: an embedding's ids count as batched only if they come from one of
            them (T5's (T, T) relative-position buckets never do, even when T equals B).

    Returns:
        :class:`PerSampleGradNorms` with ``values`` NaN (a scalar loss has no per-sample values).

    Raises:
        ValueError: no scalar loss with a graph, ``wrt`` without a gradient, a layer that mixes samples.

    Example:


        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> r = per_sample_grad_norms_of_loss(model, lambda: nn.functional.cross_entropy(model(x), y), 5)
        >>> ref = per_sample_grad_norms(model, x, lambda out: nn.functional.cross_entropy(out, y, reduction="none"))
        >>> torch.allclose(r.param_norms, ref[1])
        True
    """
    if reduction not in LOSS_REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {list(LOSS_REDUCTIONS)}, got {reduction!r}.")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"`batch` must be the number of samples (an int ≥ 1), got {batch!r}.")
    # Closed-form layers only when every trainable parameter has one (the fused monitor's light recording);
    # when one of them did not run (its weight used by another module: T5's `shared`), the model is measured
    # again with every module recorded, and from then on at once (remembered, weakly, with the model)
    recorder = GradNormRecorder(model, batch, batch_tensors)
    restricted = _RECORD_ALL.get(model) is None and recorder.restrict_to_closed_forms()
    with recorder:
        with torch.enable_grad():
            loss = loss_fn()
        if restricted and recorder.not_run():
            _RECORD_ALL[model] = True
            recorder.stop()
            return per_sample_grad_norms_of_loss(model, loss_fn, batch, wrt=wrt, reduction=reduction,
                                                 batch_tensors=batch_tensors)
        if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise ValueError(
                "`loss_fn()` must return the batch's scalar loss with its autograd graph; got "
                + (f"a tensor of shape {list(loss.shape)} (requires_grad={loss.requires_grad})"
                   if isinstance(loss, Tensor) else type(loss).__name__)
                + ". Do not call it under `torch.no_grad()`."
            )
        if callable(wrt):
            wrt = wrt()
        targets = [wrt] if wrt is not None else []
        grads = torch.autograd.grad(loss.reshape(()), targets + recorder.outputs(), allow_unused=True)
    factor = float(batch) if reduction == "mean" else 1.0
    layer = {k: v * factor**2 for k, v in recorder.layer_squared_norms(batch, upcast_records=True).items()}
    if wrt is not None:
        if grads[0] is None:
            raise ValueError("`loss_fn()` does not depend on `wrt` (no autograd path): pass the tensor the loss uses.")
        g = grads[0].reshape(batch, -1)
        x_norms = torch.linalg.vector_norm(g, dim=1, dtype=accumulation_dtype(g.dtype)) * factor
    else:
        x_norms = torch.full((batch,), math.nan, device=loss.device)
    zero = torch.zeros(batch, dtype=accumulation_dtype(loss.dtype), device=loss.device)
    param_sq = sum(layer.values(), zero)
    return PerSampleGradNorms(x_norms, param_sq.sqrt(), layer, torch.full_like(zero, math.nan))
