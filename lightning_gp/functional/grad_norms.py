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
import warnings
import weakref
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_gp.functional._checks import check_batched, check_bool, check_per_sample
from lightning_gp.functional._layers import BATCH_NORM_LAYERS
from lightning_gp.functional._norm_rules import UnbatchedLayer, linear_sq, outer_factors, row_sq, rule, tied_sq
from lightning_gp.functional._torch_private import tensor_version, tree_flatten, tree_unflatten


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


class _Use:
    """One call of a module during the forward: its inputs, and (filled during backward) output grads."""

    def __init__(self, args: tuple, kwargs: dict, output: object) -> None:
        self.args, self.kwargs = args, kwargs
        flat, self.out_spec = tree_flatten(output)
        self.out_index = [i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad]
        self.outputs = [flat[i] for i in self.out_index]
        self.grads: dict[int, Tensor] = {}
        self.versions = tensor_versions((args, kwargs))
        self.unbatched = False  # a call whose inputs are provably not the batch's (see GradNormRecorder)

    def store(self, i: int) -> Callable[[Tensor], None]:
        def hook(grad: Tensor) -> None:
            self.grads[i] = grad.detach()

        return hook


def _name(name: str) -> str:
    return name or "_root"


def linear_squared_norms(h: Tensor, g: Tensor, *, weight: bool = True, bias: bool = True) -> Tensor:
    """Per-sample ‖∇_W fᵢ‖² + ‖∇_b fᵢ‖² of a Linear layer from its input ``h`` and output gradient ``g``.

    Args:
        h: layer input of shape (B, d_in) or (B, T..., d_in) (all middle dimensions are a sequence).
        g: gradient of Σᵢ fᵢ with respect to the layer output, (B, d_out) or (B, T..., d_out).
        weight: include the weight's term (False when the weight is frozen).
        bias: include the bias' term (False when there is no bias or it is frozen).

    Example:

        >>> h, g = torch.randn(3, 4), torch.randn(3, 2)
        >>> explicit = torch.einsum("bo,bi->boi", g, h).square().sum((1, 2)) + g.square().sum(1)
        >>> torch.allclose(linear_squared_norms(h, g), explicit)
        True
    """
    b = h.shape[0]
    if b == 0:  # an empty batch: no per-sample norms (a reshape to (0, -1, d) would be ambiguous)
        return g.new_zeros(0)
    h3, g3 = h.reshape(b, -1, h.shape[-1]), g.reshape(b, -1, g.shape[-1])
    if h3.shape[1] == 1 and weight:
        # No sequence: ‖gᵢhᵢᵀ‖²_F = ‖gᵢ‖²‖hᵢ‖² and the bias term is ‖gᵢ‖² itself, so ‖gᵢ‖² is computed once
        # (the fused monitor runs this on every layer of every monitored training step).
        g_sq, h_sq = row_sq(g3[:, 0]), row_sq(h3[:, 0])
        return g_sq * (h_sq + 1) if bias else g_sq * h_sq
    return linear_sq(h3, g3, weight, bias)


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


def _batch_dim(module: nn.Module) -> int:
    # Attention and recurrent layers default to (T, B, ...) unless batch_first=True.
    return 1 if getattr(module, "batch_first", True) is False else 0


def _fallback(name: str, module: nn.Module, params: dict[str, Tensor], uses: list[_Use], batch: int) -> dict:
    """Exact per-sample gradients {name: (B, ...)} of any layer by torch.func: vmap over samples of grad of
    ⟨layer(inp), g⟩; empty when no call reached the loss."""
    bd = _batch_dim(module)
    if bd != 0:  # (T, B, ...) outputs next to (B, T, S) attention weights: no one batch dimension to vmap over
        raise UnbatchedLayer(f"Layer '{name}' ({type(module).__name__}) is not batch-first.", name)
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


def check_versions(uses: dict[str, list[_Use]]) -> None:
    """Raise if a recorded module input was modified in place after the module ran."""
    for name, us in uses.items():
        for use in us:
            if tensor_versions((use.args, use.kwargs)) != use.versions:
                raise RuntimeError(
                    f"An input of module '{_name(name)}' was modified in place after the module ran, so its "
                    f"recorded activations are stale. Avoid in-place ops on layer inputs (e.g. `x += ...`)."
                )


def tensor_versions(collection: object) -> list[int]:
    """The version counters of the tensors in ``collection`` (any pytree), in order."""
    return [tensor_version(t) for t in tree_flatten(collection)[0] if isinstance(t, Tensor)]


def _own_params(module: nn.Module) -> dict[str, Tensor]:
    return {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}


def _broadcast(module: nn.Module, uses: list[_Use], batch: int) -> bool:
    """An embedding looked up once for the whole batch (position ids of shape (1, T)) and broadcast: its output
    gradient is summed over the samples, so its per-sample gradient is read off the module that broadcasts it."""
    grads = [g for use in uses for g in use.grads.values()]
    return batch > 1 and isinstance(module, nn.Embedding) and any(g.ndim and g.shape[0] == 1 for g in grads)


def _expand_broadcast_lookup(mod: nn.Module, args: tuple, output: object, batch: int | None) -> tuple | None:
    """An Embedding looked up once for the whole batch ((1, T) position ids, as GPT-2 and BERT do) is broadcast
    over the samples by the next op. Its output expanded to the batch (a view: the op computes the same values)
    makes that op's gradient per sample arrive at the embedding, so its closed form applies."""
    if (type(mod) is not nn.Embedding or not batch or batch == 1 or not args or not isinstance(output, Tensor)
            or not isinstance(args[0], Tensor) or args[0].ndim == 0 or args[0].shape[0] != 1):
        return None
    ids = args[0].expand(batch, *args[0].shape[1:])
    return (ids, *args[1:]), output.expand(batch, *output.shape[1:])


def _unit_of(name: str, uses: dict[str, list[_Use]], batch: int, modules: dict[str, nn.Module]) -> str | None:
    """The module whose recorded calls carry the per-sample gradient of ``name``'s parameters: ``name`` itself,
    or the nearest recorded ancestor when it never ran (its parameters were used by an enclosing module, e.g.
    ``MultiheadAttention.out_proj``) or was broadcast over the batch (:func:`_broadcast`)."""
    unit = name
    while not uses.get(unit) or _broadcast(modules[unit], uses[unit], batch):
        if not unit:
            return "" if "" in uses else None
        unit = unit.rpartition(".")[0]
    return unit


def parameter_units(modules: dict[str, nn.Module], uses: dict[str, list[_Use]], batch: int) -> dict[str, dict]:
    """{unit: {parameter name relative to the unit: parameter}} for every trainable parameter, each once.

    A parameter shared by several modules (tied weights) is listed under every unit that uses it.
    """
    units = {name: _unit_of(name, uses, batch, modules) for name, mod in modules.items() if _own_params(mod)}
    # A parameter held by a module that ran is measured there only: an ancestor replayed for a module that did
    # not run (BART's and T5's `shared`, tied into embed_tokens modules that ran) would count it a second time.
    measured = {id(p) for name, unit in units.items() if unit == name for p in _own_params(modules[name]).values()}
    groups: dict[str, dict[str, Tensor]] = {}
    for name, mod in modules.items():
        own = _own_params(mod)
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
    gradient, which keeps activation-sized buffers alive through the backward (≈10% of an MLP step on CPU).
    """
    keep, names = {}, {}
    for name, mod in modules.items():
        own = set(_own_params(mod))
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


def not_run(recorder: GradNormRecorder) -> list[str]:
    """The hooked modules owning trainable parameters that did not run, except a ``MultiheadAttention``'s
    ``out_proj`` when the attention ran (the attention uses its weights without calling it)."""
    ran = tuple(name + "." for name, us in recorder.uses.items()
                if us and isinstance(recorder.modules[name], nn.MultiheadAttention))
    return [name for name, us in recorder.uses.items()
            if not us and not name.startswith(ran) and _own_params(recorder.modules[name])]


def _layer_norms(modules: dict[str, nn.Module], uses: dict[str, list[_Use]], batch: int,
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
            raise UnbatchedLayer(f"Layer '{_name(name)}' ({type(modules[name]).__name__}) looks up ids that are not "
                                 f"the batch's (position buckets shared by all samples).", _name(name))
    groups = parameter_units(modules, uses, batch)
    empty = {}  # units whose every parameter is skipped: 0 here, their norms come from the exact route
    if skip:
        for unit, ps in list(groups.items()):
            kept = {k: p for k, p in ps.items() if id(p) not in skip}
            if not kept:
                p0 = next(iter(ps.values()))
                empty[_name(unit)] = torch.zeros(batch, dtype=p0.dtype, device=p0.device)
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
        mod, label = modules[unit], _name(unit)
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
        grads = _fallback(label, mod, params, uses[unit], batch)
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
    order = {_name(n): i for i, n in enumerate(modules)}
    return dict(sorted({**empty, **out}.items(), key=lambda kv: order.get(kv[0], len(order))))


class GradNormRecorder:
    """Records what the ghost norms need during an *ordinary* forward and backward of ``model``.

    While started, forward hooks keep each module's inputs and tensor hooks catch the gradients at its
    outputs, whatever runs the backward (``loss.backward()``, Lightning's automatic optimization,
    ``torch.autograd.grad``); nothing else changes, no ``.grad`` is touched. Afterwards
    `layer_squared_norms` returns each layer's per-sample squared gradient norm *of the quantity
    that was differentiated*: for a loss ``mean(ℓᵢ)`` that is ‖∇θℓᵢ‖²/B², so multiply by B² (the
    reduction is the caller's knowledge). This is how a monitor can piggyback on the training step's own
    backward instead of paying a second one. `per_sample_grad_norms_by_layer` is built on it.

    Example:

        >>> model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
        >>> x = torch.randn(5, 3)
        >>> with GradNormRecorder(model) as rec:
        ...     model(x).sum().backward()  # a plain backward of Σᵢ fᵢ
        >>> sq = rec.layer_squared_norms(5)
        >>> ref = per_sample_grad_norms_by_layer(model, x, lambda out: out.sum(1)).layer_squared_norms
        >>> all(torch.allclose(sq[k], ref[k]) for k in ref)
        True
    """

    def __init__(self, model: nn.Module, batch: int | None = None, batch_tensors: list[Tensor] | None = None) -> None:
        self.model = model
        self.batch = batch  # when known: an Embedding looked up once as (1, ...) is expanded to it (see _hook)
        # when given: token ids are batched only if they come from these (storage) or are expanded (stride 0)
        self.batch_tensors = batch_tensors
        self.modules = dict(model.named_modules())
        self.uses: dict[str, list[_Use]] = {name: [] for name in self.modules}
        self._handles: list = []

    def start(self) -> GradNormRecorder:
        """Clear earlier records and hook every module; returns ``self``. Raises ValueError on train-mode BatchNorm."""
        for name, mod in self.modules.items():
            if isinstance(mod, BATCH_NORM_LAYERS) and mod.training:
                raise ValueError(
                    f"Module '{_name(name)}' ({type(mod).__name__}) is in training mode and mixes the samples "
                    f"of a batch, so per-sample gradients are not defined. Call `model.eval()` first."
                )
        self.stop()
        self.uses = {name: [] for name in self.modules}
        try:
            for name, mod in self.modules.items():
                self._handles.append(mod.register_forward_hook(self._hook(name), with_kwargs=True))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Remove every hook (module and tensor hooks); the records stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> GradNormRecorder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _hook(self, name: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            if not torch.is_grad_enabled():
                return None  # a no-grad forward (validation, a metric) has no backward to record
            expanded = _expand_broadcast_lookup(mod, args, output, self.batch)
            if expanded is not None:
                args, output = expanded
            use = _Use(args, kwargs, output)
            use.unbatched = expanded is None and not self._ids_from_batch(mod, args)
            for i, out in zip(use.out_index, use.outputs, strict=True):
                self._handles.append(out.register_hook(use.store(i)))
            self.uses[name].append(use)
            return output if expanded is not None else None

        return hook

    def _ids_from_batch(self, mod: nn.Module, args: tuple) -> bool:
        """False for an Embedding whose ids are not the batch's: not a view of a batch tensor, not expanded over
        the batch, and not the same in every row (T5's (T, T) relative-position buckets, also when T equals the
        batch size). Ids made inside the model with one row per sample alike (RoBERTa's zero token types) pass."""
        if self.batch_tensors is None or not isinstance(mod, nn.Embedding) or not args:
            return True
        ids = args[0]
        if not isinstance(ids, Tensor) or ids.ndim < 2 or ids.stride(0) == 0:
            return True
        ptr = ids.untyped_storage().data_ptr()
        if any(t.untyped_storage().data_ptr() == ptr for t in self.batch_tensors):
            return True
        return not bool((ids != ids[:1]).any())  # one host read, only for ids the model made itself

    def outputs(self) -> list[Tensor]:
        """Every recorded module output that requires grad, once each."""
        seen: set[int] = set()
        return [o for us in self.uses.values() for u in us for o in u.outputs if not (id(o) in seen or seen.add(id(o)))]

    def layer_squared_norms(self, batch: int, skip: frozenset[int] = frozenset()) -> dict[str, Tensor]:
        """Per-sample squared norms of each layer's trainable parameters' gradient, keyed by module name
        (the parameters whose ``id`` is in ``skip`` left out)."""
        check_versions(self.uses)
        return _layer_norms(self.modules, self.uses, batch, skip)


def per_sample_grad_norms_by_layer(
    model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor], *, input_norms: bool = True
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
            convolution is ≈15 % of a step, and gives NaN input norms.

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
        layers = {_name(n): empty for n, m in modules.items() if _own_params(m)}
        return PerSampleGradNorms(empty, empty, layers, empty)
    # Hook only the layers with parameters when all have a closed form; if one of them did not run (its
    # parameters may be used by another module's forward), measure again with every module hooked.
    restricted = closed_form_modules(modules)
    result = _measure(model, inputs, loss_fn, restricted, input_norms) if restricted is not None else None
    return result if result is not None else _measure(model, inputs, loss_fn, None, input_norms)


def _measure(model: nn.Module, inputs: Tensor, loss_fn: Callable, modules: dict | None,
             input_norms: bool) -> PerSampleGradNorms | None:
    """One forward and backward with ``modules`` hooked (all when None); None when a hooked layer did not run.

    Layers whose calls do not keep the samples apart along their batch dimension (checked from the gradient
    of one sample's value, see :func:`unbatched_units`), and layers ``torch.func`` cannot replay (recurrent
    layers, data-dependent control flow), are measured exactly by :func:`exact_squared_norms` instead.
    """
    batch = inputs.shape[0]
    floating = inputs.is_floating_point() and input_norms
    x = inputs.detach().requires_grad_(True) if floating else inputs
    recorder = GradNormRecorder(model, batch)
    if modules is not None:
        recorder.modules = modules
    with recorder:
        with torch.enable_grad():
            values = check_per_sample(loss_fn(model(x)), batch, "loss_fn(outputs)")
        if not values.requires_grad:
            raise ValueError(
                "`loss_fn(outputs)` does not depend on the model's parameters or inputs (no autograd graph); "
                "do not call this under `torch.no_grad()`."
            )
        if modules is not None and not_run(recorder):
            return None
        # Asking for the layer outputs makes the backward reach every layer; the gradients themselves
        # come from the recorder's tensor hooks, which stay right when a later op (ReLU(inplace=True))
        # overwrites an output in place.
        targets = [x] if floating else []
        key = (tuple(inputs.shape), inputs.dtype, floating, tuple(recorder.modules))
        known = _STRUCTURE.setdefault(model, {})
        structure = known.get(key)  # (units for the exact route, does the input mix samples?)
        keep = structure is None or bool(structure[0]) or structure[1]  # the graph, for the probe or the route
        grads = torch.autograd.grad(values.sum(), targets + recorder.outputs(), allow_unused=True, retain_graph=keep)
    if structure is None:  # once per model and input shape: the probe costs about half a backward
        # after the recorder's hooks are gone: they would store the probe's gradients as the step's
        unbatched, coupled = unbatched_units(recorder, values, x if floating else None)
        structure = known[key] = (set(unbatched), coupled)
    exact_units, coupled = structure
    while True:  # units the closed forms and torch.func cannot take join the exact route (and are remembered)
        skip = _unit_params(recorder, exact_units)
        try:
            layer = recorder.layer_squared_norms(batch, skip=frozenset(skip))
            break
        except UnbatchedLayer as err:
            unit = _unit_named(recorder, err.unit)
            if unit is None or unit in exact_units:
                raise
            exact_units.add(unit)
            if not keep:  # the graph is gone: measure again, now keeping it for the exact route
                return _measure(model, inputs, loss_fn, modules, input_norms)
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


#: model → {(input shape, dtype, input norms?, hooked modules): (units that mix samples, input mixes samples?)}
_STRUCTURE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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
    checked = [(name, use, i, out) for name, us in recorder.uses.items() if _own_params(recorder.modules[name])
               for use in us for i, out in zip(use.out_index, use.outputs, strict=True)]
    tensors = ([x] if x is not None else []) + [out for *_, out in checked]
    if not tensors:
        return set(), False
    probe = torch.autograd.grad(values[-1], tensors, retain_graph=True, allow_unused=True)
    coupled = x is not None and _spills(probe[0], 0, batch)
    bad = set()
    for (name, _use, i, _), g in zip(checked, probe[1 if x is not None else 0:], strict=True):
        module = recorder.modules[name]
        dim = 0 if (i == 1 and isinstance(module, nn.MultiheadAttention)) else _batch_dim(module)
        if g is not None and _spills(g, dim, batch):
            bad.add(name)
    return bad, coupled


def _spills(g: Tensor, dim: int, batch: int) -> bool:
    """Whether a gradient of the last sample alone is non-zero outside its slice along ``dim``."""
    if g.ndim <= dim or g.shape[dim] != batch:
        return bool(g.ne(0).any())  # no batch dimension: any gradient at all comes from a broadcast
    return bool(g.narrow(dim, 0, batch - 1).ne(0).any())


def _unit_params(recorder: GradNormRecorder, units: set[str]) -> set[int]:
    """ids of the trainable parameters of ``units`` (and of their submodules)."""
    return {id(p) for name in units for p in recorder.modules[name].parameters() if p.requires_grad}


def _unit_named(recorder: GradNormRecorder, label: str) -> str | None:
    return next((n for n in recorder.modules if _name(n) == label), None)


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
                owners.setdefault(id(p), (_name(name), p))
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
