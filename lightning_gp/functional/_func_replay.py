"""Exact per-sample gradients of any layer by ``torch.func``: vmap over the samples of grad of ⟨layer(inp), g⟩.

The route for a layer with parameters but no closed form (``_norm_rules``): fed with the layer's recorded inputs
and output gradients, it costs one small per-sample backward of that layer only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gp.functional._layer_call import LayerCall
from lightning_gp.functional._norm_rules import UnbatchedLayer
from lightning_gp.functional._sharded import is_sharded, layer_type
from lightning_gp.functional._torch_private import tree_flatten, tree_unflatten


def _sample_inner_product(module: nn.Module, flat: list, spec: object, pos: list[int], dims: tuple, bd: int):
    """⟨module(one sample's inputs), that sample's output gradient⟩ as a function of the parameters."""

    def inner(p: dict[str, Tensor], grads_i: dict[int, Tensor], *ts: Tensor) -> Tensor:
        values = list(flat)
        for j, t, d in zip(pos, ts, dims, strict=True):
            values[j] = t.unsqueeze(bd) if d is not None else t
        args, kwargs = tree_unflatten(values, spec)
        out = tree_flatten(torch.func.functional_call(module, p, args, kwargs))[0]
        return sum((out[i] * gi.unsqueeze(bd)).sum() for i, gi in grads_i.items())

    return inner


def batch_dim(module: nn.Module) -> int:
    # Attention and recurrent layers default to (T, B, ...) unless batch_first=True.
    return 1 if getattr(module, "batch_first", True) is False else 0


def replayed_grads(name: str, module: nn.Module, params: dict[str, Tensor], uses: list[LayerCall], batch: int) -> dict:
    """Exact per-sample gradients {name: (B, ...)} of any layer by torch.func: vmap over samples of grad of
    ⟨layer(inp), g⟩; empty when no call reached the loss."""
    bd = batch_dim(module)
    if bd != 0:  # (T, B, ...) outputs next to (B, T, S) attention weights: no one batch dimension to vmap over
        raise UnbatchedLayer(f"Layer '{name}' ({type(module).__name__}) is not batch-first.", name)
    if any(is_sharded(p) for p in params.values()):
        raise ValueError(
            f"Layer '{name}' ({layer_type(module).__name__}) has no closed-form per-sample norm, and its torch.func "
            f"replay needs the whole weight, which FSDP2 shards across ranks. Under FSDP2 the per-sample norms cover "
            f"the layers with a closed form (Linear, Conv, normalisation, Embedding, MultiheadAttention): restrict "
            f"the monitor to them (`target=`), or train with strategy='ddp'."
        )
    total: dict[str, Tensor] = {}
    params = {k: p.detach() for k, p in params.items()}
    for use in uses:
        flat, spec = tree_flatten((use.args, use.kwargs))
        pos = [i for i, v in enumerate(flat) if isinstance(v, Tensor)]
        tensors = [flat[i].detach() for i in pos]
        dims = tuple(bd if t.ndim > bd and t.shape[bd] == batch else None for t in tensors)
        grads = dict(use.grads)
        if not grads:
            continue
        for g in grads.values():
            if g.ndim <= bd or g.shape[bd] != batch:
                raise UnbatchedLayer(
                    f"Layer '{name}' ({type(module).__name__}) returned an output of shape {tuple(g.shape)} "
                    f"without the batch ({batch}) in dimension {bd}; per-sample norms need batched layers.", name
                )
        inner = _sample_inner_product(module, flat, spec, pos, dims, bd)
        try:
            with torch.no_grad():  # grad still differentiates inside; no graph to the other parameters outside
                per_sample = torch.func.vmap(torch.func.grad(inner), in_dims=(None, bd, *dims))(params, grads, *tensors)
        except RuntimeError as err:  # recurrent layers, data-dependent control flow, dropout: no vmap replay
            why = ("draws random numbers (dropout in training mode), so its per-sample gradient cannot be replayed"
                   if "randomness" in str(err) else f"cannot be replayed per sample by torch.func ({err})")
            raise UnbatchedLayer(f"Layer '{name}' ({type(module).__name__}) {why}.", name) from err
        total = {k: total[k] + v if k in total else v for k, v in per_sample.items()}
    return total
