"""Which module's recorded calls measure each trainable parameter, and each such unit's per-sample norms.

A parameter belongs to the module that holds it when that module ran; otherwise (``MultiheadAttention.out_proj``,
a tied embedding that never ran, a lookup broadcast over the batch) to the nearest recorded ancestor. Tied and
aliased weights count once. Design notes: ``docs/design/fused-monitor.md``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_gp.functional._func_replay import replayed_grads
from lightning_gp.functional._layer_call import LayerCall, layer_label
from lightning_gp.functional._norm_rules import UnbatchedLayer, outer_factors, row_sq, rule, tied_sq


def own_params(module: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def _broadcast(module: nn.Module, uses: list[LayerCall], batch: int) -> bool:
    """An embedding looked up once for the whole batch (position ids of shape (1, T)) and broadcast: its output
    gradient is summed over the samples, so its per-sample gradient is read off the module that broadcasts it."""
    grads = [g for use in uses for g in use.grads.values()]
    return batch > 1 and isinstance(module, nn.Embedding) and any(g.ndim and g.shape[0] == 1 for g in grads)


def _unit_of(name: str, uses: dict[str, list[LayerCall]], batch: int, modules: dict[str, nn.Module]) -> str | None:
    """The module whose recorded calls carry the per-sample gradient of ``name``'s parameters: ``name`` itself,
    or the nearest recorded ancestor when it never ran (its parameters were used by an enclosing module, e.g.
    ``MultiheadAttention.out_proj``) or was broadcast over the batch (:func:`_broadcast`)."""
    unit = name
    while not uses.get(unit) or _broadcast(modules[unit], uses[unit], batch):
        if not unit:
            return "" if "" in uses else None
        unit = unit.rpartition(".")[0]
    return unit


def parameter_units(modules: dict[str, nn.Module], uses: dict[str, list[LayerCall]], batch: int) -> dict[str, dict]:
    """{unit: {parameter name relative to the unit: parameter}} for every trainable parameter, each once.

    A parameter shared by several modules (tied weights) is listed under every unit that uses it.
    """
    units = {name: _unit_of(name, uses, batch, modules) for name, mod in modules.items() if own_params(mod)}
    # A parameter held by a module that ran is measured there only: an ancestor replayed for a module that did
    # not run (BART's and T5's `shared`, tied into embed_tokens modules that ran) would count it a second time.
    measured = {id(p) for name, unit in units.items() if unit == name for p in own_params(modules[name]).values()}
    groups: dict[str, dict[str, Tensor]] = {}
    for name, mod in modules.items():
        own = own_params(mod)
        unit = units.get(name)
        if unit is None:
            continue
        if unit != name:
            own = {k: p for k, p in own.items() if id(p) not in measured}
            if not own:
                continue
        prefix = "" if unit == name else (name[len(unit) + 1 :] if unit else name) + "."
        params = groups.setdefault(unit, {})
        for k, p in own.items():
            if all(q is not p for q in params.values()):  # one name per parameter within a unit
                params[prefix + k] = p
    # A parameter aliased on a module and on its descendant (``self.w = self.lin.weight``): the ancestor's
    # replay already differentiates the descendant's use, so the descendant does not count it again.
    holders: dict[int, list[str]] = {}
    for unit, params in groups.items():
        for p in params.values():
            holders.setdefault(id(p), []).append(unit)
    for unit, params in groups.items():
        for k, p in list(params.items()):
            if any(u != unit and (u == "" or unit.startswith(u + ".")) for u in holders[id(p)]):
                del params[k]
    return {unit: params for unit, params in groups.items() if params}


def closed_form_modules(modules: dict[str, nn.Module]) -> dict[str, nn.Module] | None:
    """The modules a recorder must hook when every trainable parameter has a closed-form rule, else None.

    These are the modules owning trainable parameters, the ``MultiheadAttention`` around an ``out_proj`` (whose
    weights the attention uses without calling it), and the parent of each ``Embedding`` (which broadcasts
    position embeddings over the batch). Parameter-free modules need no hooks: each hook stores its output
    gradient, which keeps activation-sized buffers alive through the backward.
    """
    keep, names = {}, {}
    for name, mod in modules.items():
        own = set(own_params(mod))
        parent = name.rpartition(".")[0]
        if own and name.rpartition(".")[2] == "out_proj" and isinstance(modules.get(parent), nn.MultiheadAttention):
            names.setdefault(parent, set()).update("out_proj." + k for k in own)
            keep[parent] = modules[parent]
        elif own:
            names.setdefault(name, set()).update(own)
        if own:
            keep[name] = mod
        if isinstance(mod, nn.Embedding) and parent in modules:
            keep[parent] = modules[parent]
    if not all(rule(modules[name], ps) is not None for name, ps in names.items()):
        return None
    return {name: mod for name, mod in modules.items() if name in keep}


def layer_norms(modules: dict[str, nn.Module], uses: dict[str, list[LayerCall]], batch: int,
                 skip: frozenset[int] = frozenset()) -> dict[str, Tensor]:
    """Assign every trainable parameter to a unit (a module that ran) and compute each unit's norms: a
    closed-form rule (`_norm_rules`) where there is one, ``torch.func`` otherwise.

    Tied weights: the per-sample gradient of a parameter used by several units is the sum of each unit's, so
    its norm has cross terms. A weight shared by Linear and Embedding layers only takes the Gram form over
    the positions of all their calls (:func:`~lightning_gp.functional._norm_rules.tied_sq`); otherwise the
    units' per-sample gradients are built (torch.func) and summed. Either way the shared parameter is
    attributed to the first unit in ``model.named_modules()`` order that uses it. Parameters whose ``id`` is in
    ``skip`` are left out (measured by :func:`exact_squared_norms` instead); a unit left without any gets 0.
    """
    for name, us in uses.items():
        if any(u.unbatched for u in us):
            raise UnbatchedLayer(f"Layer '{layer_label(name)}' ({type(modules[name]).__name__}) looks up ids that are "
                                 f"not the batch's (position buckets shared by all samples).", layer_label(name))
    groups = parameter_units(modules, uses, batch)
    empty = {}  # units whose every parameter is skipped: 0 here, their norms come from the exact route
    if skip:
        for unit, ps in list(groups.items()):
            kept = {k: p for k, p in ps.items() if id(p) not in skip}
            if not kept:
                p0 = next(iter(ps.values()))
                empty[layer_label(unit)] = torch.zeros(batch, dtype=p0.dtype, device=p0.device)
                del groups[unit]
            else:
                groups[unit] = kept
    users: dict[int, list[str]] = {}
    for unit, params in groups.items():
        for p in params.values():
            users.setdefault(id(p), []).append(unit)
    # a shared weight has a closed form when every unit using it is a Linear or Embedding sharing only it
    linear_like = {unit for unit, params in groups.items() if isinstance(modules[unit], (nn.Linear, nn.Embedding))
                   and rule(modules[unit], set(params)) is not None
                   and all(len(users[id(p)]) == 1 for k, p in params.items() if k != "weight")}
    factored = {key for key, us in users.items() if len(us) > 1 and set(us) <= linear_like}
    out, shared, owner, factors = {}, {}, {}, {}
    for unit, params in groups.items():
        mod, label = modules[unit], layer_label(unit)
        tied = {k for k, p in params.items() if len(users[id(p)]) > 1}
        closed = rule(mod, set(params)) if all(id(params[k]) in factored for k in tied) else None
        if closed is not None:
            for k in tied:  # the shared weight: its factors, for the Gram form over all its users below
                owner.setdefault(id(params[k]), label)
                factors.setdefault(id(params[k]), []).extend(outer_factors(label, mod, uses[unit], batch))
            rest = set(params) - tied
            p0 = next(iter(params.values()))
            out[label] = closed(label, mod, uses[unit], batch, rest) if rest else torch.zeros(
                batch, dtype=p0.dtype, device=p0.device)
            continue
        grads = replayed_grads(label, mod, params, uses[unit], batch)
        first = next(iter(params.values()))
        out[label] = torch.zeros(batch, dtype=first.dtype, device=first.device)
        for k, p in params.items():
            if k in tied:
                owner.setdefault(id(p), label)
                if k in grads:
                    shared[id(p)] = shared[id(p)] + grads[k] if id(p) in shared else grads[k]
            elif k in grads:
                out[label] = out[label] + row_sq(grads[k].reshape(batch, -1))
    for key, g in shared.items():
        out[owner[key]] = out[owner[key]] + row_sq(g.reshape(batch, -1))
    for key, fs in factors.items():
        if fs:
            out[owner[key]] = out[owner[key]] + tied_sq(fs)
    order = {layer_label(n): i for i, n in enumerate(modules)}
    return dict(sorted({**empty, **out}.items(), key=lambda kv: order.get(kv[0], len(order))))
