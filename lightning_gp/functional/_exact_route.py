"""The exact route: per-sample norms of layers that mix samples, by one batched backward (``is_grads_batched``).

Which layers take it is read from autograd once per model and input shape (:func:`unbatched_units`), never
from sizes that may coincide (T == B).
"""

from __future__ import annotations

import functools
import warnings
import weakref
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lightning_gp.functional._func_replay import batch_dim
from lightning_gp.functional._layer_call import layer_label
from lightning_gp.functional._norm_rules import row_sq
from lightning_gp.functional._param_units import own_params

if TYPE_CHECKING:
    from lightning_gp.functional._recorder import GradNormRecorder


#: model → {(input shape, dtype, input norms?, hooked modules): (units that mix samples, input mixes samples?)}
STRUCTURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unbatched_units(recorder: GradNormRecorder, values: Tensor, x: Tensor | None) -> tuple[set[str], bool]:
    """The units whose calls mix samples along their batch dimension, and whether the input does.

    The structure is read from autograd, never from sizes that may coincide: the gradient of the last sample's
    value may be non-zero only in that sample's slice of each batch-first output (a (T, T) relative-position
    bias, a (B·T, D) flattened input, batch-second data or BatchNorm make it spill). One more backward, taken
    once per model and input shape (the verdicts are kept, weakly, with the model).
    """
    batch = values.shape[0]
    if batch < 2:
        return set(), False
    checked = [(name, i, out) for name, us in recorder.uses.items() if own_params(recorder.modules[name])
               for use in us for i, out in zip(use.out_index, use.outputs, strict=True)]
    if not checked and x is None:
        return set(), False
    # Judged in tensor hooks as each gradient passes, not returned by autograd (which would keep every layer's
    # output gradient to the end of the backward); the targets only make the backward reach the layers.
    spills: dict[int, bool] = {}
    handles = []
    for k, (name, i, out) in enumerate(checked):
        module = recorder.modules[name]
        dim = 0 if (i == 1 and isinstance(module, nn.MultiheadAttention)) else batch_dim(module)
        handles.append(out.register_hook(functools.partial(_judge, spills, k, dim, batch)))
    try:
        targets = ([x] if x is not None else []) + recorder.source_outputs()
        probe = torch.autograd.grad(values[-1], targets, retain_graph=True, allow_unused=True) if targets else ()
        missing = [out for k, (*_, out) in enumerate(checked) if k not in spills]
        if missing:  # outputs off the way back to the sources (a layer fed by a parameter), or unused
            torch.autograd.grad(values[-1], missing, retain_graph=True, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    coupled = x is not None and probe[0] is not None and _spills(probe[0], 0, batch)
    return {checked[k][0] for k, bad in spills.items() if bad}, coupled


def _judge(spills: dict[int, bool], k: int, dim: int, batch: int, g: Tensor) -> None:
    spills[k] = _spills(g, dim, batch)


def _spills(g: Tensor, dim: int, batch: int) -> bool:
    """Whether a gradient of the last sample alone is non-zero outside its slice along ``dim``."""
    if g.ndim <= dim or g.shape[dim] != batch:
        return bool(g.ne(0).any())  # no batch dimension: any gradient at all comes from a broadcast
    return bool(g.narrow(dim, 0, batch - 1).ne(0).any())


def unit_params(recorder: GradNormRecorder, units: set[str]) -> set[int]:
    """ids of the trainable parameters of ``units`` (and of their submodules)."""
    return {id(p) for name in units for p in recorder.modules[name].parameters() if p.requires_grad}


def unit_named(recorder: GradNormRecorder, label: str) -> str | None:
    return next((n for n in recorder.modules if layer_label(n) == label), None)


def exact_squared_norms(values: Tensor, recorder: GradNormRecorder, params: set[int],
                        x: Tensor | None) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-sample squared gradient norms of the parameters ``params`` (ids), by one backward vmapped over the
    samples' one-hot cotangents (``is_grads_batched``): exact for any model, with no assumption on where the
    batch is; memory B × those parameters. Each parameter counts once, under the first module in
    ``named_modules()`` order holding it. Also ‖∇ₓfᵢ‖² when ``x`` is given."""
    owners: dict[int, tuple[str, Tensor]] = {}
    for name, module in recorder.modules.items():
        for p in module.parameters(recurse=False):
            if id(p) in params and p.requires_grad:
                owners.setdefault(id(p), (layer_label(name), p))
    tensors = [p for _, p in owners.values()] + ([x] if x is not None else [])
    batch = values.shape[0]
    eye = torch.eye(batch, dtype=values.dtype, device=values.device)
    with warnings.catch_warnings():  # ops without a batching rule run a slower loop: still exact, said in the docs
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = torch.autograd.grad(values, tensors, grad_outputs=eye, is_grads_batched=True, allow_unused=True)
    out: dict[str, Tensor] = {}
    for (label, p), g in zip(owners.values(), grads, strict=False):
        sq = row_sq(g.reshape(batch, -1)) if g is not None else torch.zeros(batch, dtype=p.dtype, device=p.device)
        out[label] = out[label] + sq if label in out else sq
    x_sq = None
    if x is not None:
        g = grads[-1]
        x_sq = row_sq(g.reshape(batch, -1)) if g is not None else torch.zeros(batch, dtype=x.dtype, device=x.device)
    return out, x_sq
