"""Recording a model's ordinary forward and backward for per-sample gradient norms: the layers' calls and the
gradients at their outputs, caught by hooks, whatever runs the backward.

:class:`GradNormRecorder` records any model (every module, or the closed-form ones); :class:`LinearTap` is its
light path for models whose parameterised layers are all ``nn.Linear`` (the row norms are taken in the hook and
the activations dropped). The fused monitor and the MLP inequality record through them; the norms are computed
by :mod:`~lightning_gp.functional._param_units`. Design notes: ``docs/design/fused-monitor.md``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gp.functional._layer_call import LayerCall, check_versions, layer_label, tensor_versions
from lightning_gp.functional._layers import BATCH_NORM_LAYERS
from lightning_gp.functional._norm_rules import linear_squared_norms, rule
from lightning_gp.functional._param_units import _broadcast, closed_form_modules, layer_norms, own_params
from lightning_gp.functional._sharded import layer_type
from lightning_gp.functional._torch_private import tensor_version, tree_map
from lightning_gp.functional.gradients import accumulation_dtype, upcast


def _expand_broadcast_lookup(mod: nn.Module, args: tuple, output: object, batch: int | None) -> tuple | None:
    """An Embedding looked up once for the whole batch ((1, T) position ids, as GPT-2 and BERT do) is broadcast
    over the samples by the next op. Its output expanded to the batch (a view: the op computes the same values)
    makes that op's gradient per sample arrive at the embedding, so its closed form applies."""
    if (layer_type(mod) is not nn.Embedding or not batch or batch == 1 or not args or not isinstance(output, Tensor)
            or not isinstance(args[0], Tensor) or args[0].ndim == 0 or args[0].shape[0] != 1):
        return None
    ids = args[0].expand(batch, *args[0].shape[1:])
    return (ids, *args[1:]), output.expand(batch, *output.shape[1:])


class _HookSet:
    """The hooks of a recording, put on and taken off in one place: forward hooks on modules, and tensor hooks on
    what a forward produced (a layer's output, an input), which catch the gradients whatever runs the backward.
    Module hooks may stay over several recordings (:class:`LinearTap`); tensor hooks are per recording."""

    def __init__(self) -> None:
        self._module_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._tensor_handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def hooked(self) -> bool:
        """Whether the module hooks are on."""
        return bool(self._module_handles)

    def _hook_modules(self, hooks: list[tuple[nn.Module, Callable[..., Any]]], *, with_kwargs: bool = False) -> None:
        try:
            for module, hook in hooks:
                self._module_handles.append(module.register_forward_hook(hook, with_kwargs=with_kwargs))
        except BaseException:
            self._release()
            raise

    def _hook_tensor(self, tensor: Tensor, hook: Callable[[Tensor], None]) -> None:
        self._tensor_handles.append(tensor.register_hook(hook))

    def _release_tensors(self) -> None:
        for handle in self._tensor_handles:
            handle.remove()
        self._tensor_handles.clear()

    def _release(self) -> None:
        """Take every hook off, module and tensor hooks alike."""
        self._release_tensors()
        for handle in self._module_handles:
            handle.remove()
        self._module_handles.clear()


class GradNormRecorder(_HookSet):
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
        >>> from lightning_gp.functional import per_sample_grad_norms_by_layer
        >>> ref = per_sample_grad_norms_by_layer(model, x, lambda out: out.sum(1)).layer_squared_norms
        >>> all(torch.allclose(sq[k], ref[k]) for k in ref)
        True
    """

    def __init__(self, model: nn.Module, batch: int | None = None, batch_tensors: list[Tensor] | None = None, *,
                 modules: dict[str, nn.Module] | None = None, input_grads: bool = False) -> None:
        self.model = model
        self.batch = batch  # when known: an Embedding looked up once as (1, ...) is expanded to it (see _hook)
        # when given: token ids are batched only if they come from these (storage) or are expanded (stride 0)
        self.batch_tensors = batch_tensors
        self.input_grads = input_grads  # also catch the gradients at the inputs that require grad
        #: the modules hooked, by name (default: all of ``model.named_modules()``)
        self.modules = dict(model.named_modules()) if modules is None else dict(modules)
        self.uses: dict[str, list[LayerCall]] = {name: [] for name in self.modules}
        #: (batch, skip, upcast_records) while norms are computed during the backward (:meth:`compute_eagerly`)
        self._eager: tuple[int, frozenset[int], bool] | None = None
        self._eligible: dict[str, Callable[..., Tensor]] | None = None
        #: norms computed during the backward, by layer label
        self.eager_norms: dict[str, Tensor] = {}
        self._paused = False
        self._droppable: set[str] = set()  # layers whose outputs are not kept (keep_outputs_of_sources_only)
        super().__init__()

    def compute_eagerly(self, batch: int, skip: frozenset[int] = frozenset(), *, upcast_records: bool = False) -> None:
        """Compute each layer's norms in the backward, as soon as its output gradients have all arrived, and drop
        its records then (the closed-form layers whose parameters no other module holds), instead of keeping
        every layer's inputs and output gradients until :meth:`layer_squared_norms`. Opacus' ghost clipping
        keeps its memory this way. Call before the backward; the records of those layers are gone after it (a
        probe that reads them runs before it, :meth:`paused`)."""
        self._eager, self._eligible, self.eager_norms = (batch, skip, upcast_records), None, {}

    def _candidates(self, skip: frozenset[int]) -> dict[str, Callable[..., Tensor]]:
        """The layers with a closed-form rule for all their trainable parameters, none of them shared with another
        module or in ``skip``, and no child holding parameters (whose norms an ancestor may have to measure)."""
        holders: dict[int, int] = {}
        for mod in self.model.modules():
            for p in mod.parameters(recurse=False):
                holders[id(p)] = holders.get(id(p), 0) + 1
        out = {}
        for name, mod in self.modules.items():
            params = own_params(mod)
            if (not params or any(holders.get(id(p), 0) > 1 or id(p) in skip for p in params.values())
                    or any(own_params(m) for n, m in mod.named_modules() if n)):
                continue
            closed = rule(mod, set(params))
            if closed is not None:
                out[name] = closed
        return out

    def _eligible_layers(self) -> dict[str, Callable[..., Tensor]]:
        """The layers measured during the backward: the :meth:`_candidates` that ran, on the batch's samples.
        Decided at the first gradient: by then the forward, and so every call, is recorded."""
        _, skip, _ = self._eager  # type: ignore[misc]
        return {name: closed for name, closed in self._candidates(skip).items()
                if self.uses.get(name) and not any(u.unbatched for u in self.uses[name])}

    def _finish_eagerly(self, name: str) -> None:
        """The norms of layer ``name`` once all its calls' gradients are in; its records dropped."""
        if self._eligible is None:
            self._eligible = self._eligible_layers()
        if name not in self._eligible or not all(u.received for u in self.uses[name]):
            return
        closed = self._eligible.pop(name)
        batch, _, upcast_records = self._eager  # type: ignore[misc]
        mod, uses = self.modules[name], self.uses[name]
        if _broadcast(mod, uses, batch):
            return  # a lookup broadcast over the batch: measured with the module that broadcasts it
        try:
            check_versions({name: uses})
            if upcast_records:
                _upcast(uses)
            sq = closed(layer_label(name), mod, uses, batch, set(own_params(mod)))
        except Exception:  # deferred, not lost: layer_squared_norms measures it again and raises its error
            return
        self.eager_norms[layer_label(name)] = sq
        for use in uses:
            use.release()

    def start(self) -> GradNormRecorder:
        """Clear earlier records and hook every module; returns ``self``. Raises ValueError on train-mode BatchNorm."""
        for name, mod in self.modules.items():
            if isinstance(mod, BATCH_NORM_LAYERS) and mod.training:
                raise ValueError(
                    f"Module '{layer_label(name)}' ({type(mod).__name__}) is in training mode and mixes the samples "
                    f"of a batch, so per-sample gradients are not defined. Call `model.eval()` first."
                )
        self.stop()
        self.uses = {name: [] for name in self.modules}
        self._eager, self._eligible, self.eager_norms = None, None, {}
        self._hook_modules([(mod, self._hook(name)) for name, mod in self.modules.items()], with_kwargs=True)
        return self

    def stop(self) -> None:
        """Remove every hook (module and tensor hooks); the records stay readable."""
        self._release()

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
            use = LayerCall(args, kwargs, output)
            use.unbatched = expanded is None and not self._ids_from_batch(mod, args)
            for i, out in zip(use.out_index, use.outputs, strict=True):
                self._hook_tensor(out, self._store(name, use, i))
            if name in self._droppable and not use.source:
                use.output, use.outputs = None, [None] * len(use.outputs)  # type: ignore[list-item]
            if self.input_grads:
                for i, arg in enumerate(args):
                    if isinstance(arg, Tensor) and arg.requires_grad:
                        self._hook_tensor(arg, use.store_input(i))
            self.uses[name].append(use)
            return output if expanded is not None else None

        return hook

    def _store(self, name: str, use: LayerCall, i: int) -> Callable[[Tensor], None]:
        store = use.store(i)

        def hook(grad: Tensor) -> None:
            if self._paused:
                return
            store(grad)
            if self._eager is not None:
                self._finish_eagerly(name)

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

    def source_outputs(self) -> list[Tensor]:
        """The recorded outputs of the calls fed by no tensor that requires grad (the first layers, the
        embeddings), once each: a backward to them passes every layer whose input descends from them."""
        seen: set[int] = set()
        return [o for us in self.uses.values() for u in us if u.source
                for o in u.outputs if not (id(o) in seen or seen.add(id(o)))]

    def unreached(self) -> list[Tensor | None]:
        """The recorded outputs whose gradient did not arrive (of the layers not measured in the backward); None
        for one :meth:`keep_outputs_of_sources_only` let go of."""
        return [o for name, us in self.uses.items() if layer_label(name) not in self.eager_norms for u in us
                for i, o in zip(u.out_index, u.outputs, strict=True) if i not in u.grads]

    def keep_outputs_of_sources_only(self) -> None:
        """Before the forward: of the layers that can be measured in the backward (:meth:`compute_eagerly`), keep
        no reference to an output, but those of the calls fed by no tensor that requires grad (the backward's
        targets). Their gradients still arrive through the tensor hooks; an output no later op saves (a
        projection whose attention copies it, a layer before a residual sum) is then freed in the forward, as
        without the recorder. For a call whose records nothing reads after the backward (no probe, no exact
        route, no second backward to unreached outputs)."""
        self._droppable = set(self._candidates(frozenset()))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Store no gradient while inside (another backward through the recorded graph: a probe)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def calls(self, name: str) -> list[LayerCall]:
        """The recorded calls of the module ``name`` (empty when it did not run)."""
        return self.uses[name]

    def not_run(self) -> list[str]:
        """The hooked modules owning trainable parameters that did not run, except a ``MultiheadAttention``'s
        ``out_proj`` when the attention ran (the attention uses its weights without calling it)."""
        ran = tuple(name + "." for name, us in self.uses.items()
                    if us and isinstance(self.modules[name], nn.MultiheadAttention))
        return [name for name, us in self.uses.items()
                if not us and not name.startswith(ran) and own_params(self.modules[name])]

    def drop(self, names: list[str]) -> dict[str, nn.Module]:
        """Stop measuring the modules ``names`` (ones that did not run, say); returns them by name."""
        dropped = {name: self.modules.pop(name) for name in names}
        for name in names:
            self.uses.pop(name, None)
        return dropped

    def restrict_to_closed_forms(self) -> bool:
        """Hook only the modules :func:`~lightning_gp.functional._param_units.closed_form_modules` names, when every
        trainable parameter has a closed-form rule (Linear, Conv, norm layers, Embedding, MultiheadAttention);
        hooks on parameter-free modules only serve ``torch.func`` replays. Call before :meth:`start`. Not done
        with a BatchNorm in training mode, so that :meth:`start` still raises its error. Returns whether it did.
        """
        if any(isinstance(m, BATCH_NORM_LAYERS) and m.training for m in self.modules.values()):
            return False
        keep = closed_form_modules(self.modules)
        if keep is None:
            return False
        self.modules = keep
        self.uses = {name: [] for name in keep}
        return True

    def layer_squared_norms(self, batch: int, skip: frozenset[int] = frozenset(), *,
                            upcast_records: bool = False) -> dict[str, Tensor]:
        """Per-sample squared norms of each layer's trainable parameters' gradient, keyed by module name
        (the parameters whose ``id`` is in ``skip`` left out). ``upcast_records``: half-precision records are
        brought to float32 first (the squares of scaled float16 gradients overflow)."""
        check_versions(self.uses)  # before any input is replaced by a float32 copy below
        # measured in the backward, unless a later call moved their parameters to the exact route (``skip``)
        done = {name: self.eager_norms[layer_label(name)] for name, mod in self.modules.items()
                if layer_label(name) in self.eager_norms and not any(id(p) in skip for p in own_params(mod).values())}
        if self._eager is not None:
            settings, self._eager, self._eligible = self._eager, None, None
            if done and settings != (batch, frozenset(skip), upcast_records):
                raise RuntimeError(f"GradNormRecorder: layer_squared_norms{(batch, skip, upcast_records)} after "
                                   f"compute_eagerly{settings}: the layers measured in the backward used those.")
        rest = {name: mod for name, mod in self.modules.items() if name not in done}
        uses = {name: us for name, us in self.uses.items() if name in rest}
        if upcast_records:
            for us in uses.values():
                _upcast(us)
        out = {**layer_norms(rest, uses, batch, skip), **{layer_label(n): sq for n, sq in done.items()}}
        order = {layer_label(n): i for i, n in enumerate(self.modules)}
        return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def _upcast(uses: list[LayerCall]) -> None:
    """Half-precision records to float32 (the squares of scaled float16 gradients overflow)."""
    for use in uses:
        use.grads = {i: upcast(g) for i, g in use.grads.items()}
        use.args, use.kwargs = tree_map(upcast, (use.args, use.kwargs))
        use.versions = tensor_versions((use.args, use.kwargs))


@dataclass
class TapCall:
    """One recorded call of a tapped layer: its input h and the output gradient g, or only their row norms.

    For a layer called once on a (B, d) input the backward hook keeps ``h_norm``/``g_norm`` and drops ``h``
    (:meth:`LinearTap._on_grad`); otherwise it keeps ``grad`` for :func:`linear_squared_norms`.
    """

    input: Tensor | None
    version: int
    grad: Tensor | None = None
    h_norm: Tensor | None = None
    g_norm: Tensor | None = None

    @property
    def received(self) -> bool:
        return self.grad is not None or self.g_norm is not None


class LinearTap(_HookSet):
    """The fused recording of a model whose parameterised layers are all ``nn.Linear``: the light path.

    A forward hook on each layer keeps the layer's input h and puts a tensor hook on its output for the
    output gradient g; nothing else is recorded. A layer called several times has per-sample gradient
    Σ_calls gᵢhᵢᵀ: its calls are stacked along the sequence dimension, where :func:`linear_squared_norms`
    sums over positions. The forward hooks are put on by the first :meth:`start` and stay, recording
    nothing between steps, until :meth:`remove`: the monitor keeps one tap over consecutive monitored
    steps and removes it at the first step it does not monitor, at teardown and when a step raises.
    Design notes: ``docs/design/fused-monitor.md``.
    """

    def __init__(self, layers: dict[str, nn.Module], owner: str = "GradientNormMonitor") -> None:
        self.layers = layers
        self.owner = owner
        self.calls: dict[str, list[TapCall]] = {name: [] for name in layers}
        self.recording = False
        self.batch = 0
        super().__init__()

    def start(self, batch: int) -> LinearTap:
        """Record the coming forward/backward of a batch of ``batch`` samples."""
        self.stop()
        self.clear()
        self.batch = batch
        self.recording = True
        if not self.hooked:
            self._hook_modules([(layer, self._forward_hook(name or "_root", layer))
                                for name, layer in self.layers.items()])
        return self

    def stop(self) -> None:
        """End the step's recording: no more records, the tensor hooks removed (the forward hooks stay)."""
        self.recording = False
        self._release_tensors()

    def clear(self) -> None:
        """Drop the records (they hold activations)."""
        for calls in self.calls.values():
            calls.clear()

    def remove(self) -> None:
        """Stop, drop the records and remove the forward hooks."""
        self.stop()
        self.clear()
        self._release()

    def _forward_hook(self, label: str, layer: nn.Module) -> Callable[..., None]:
        calls = self.calls[next(name for name, m in self.layers.items() if m is layer)]

        # Run eagerly under torch.compile: the tensor hook it registers cannot be traced (a side effect on
        # Python state), so the graph breaks here anyway; disabled, the bookkeeping adds no graphs of its own.
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # `module is layer`: a deep copy of the model copies this hook; its calls are not recorded
            if module is layer and self.recording and torch.is_grad_enabled() and output.requires_grad:
                h = args[0]
                record = TapCall(input=h, version=tensor_version(h))
                calls.append(record)
                self._hook_tensor(output, functools.partial(self._on_grad, label, calls, record))

        return hook

    def _on_grad(self, label: str, calls: list[TapCall], record: TapCall, grad: Tensor) -> None:
        """Tensor hook on a layer's output: keep its gradient g; for a layer called once on a (B, d) input keep
        only the row norms of g and of the layer's input h, and drop h.

        The norms are taken here because both are in cache now: g was just computed, and h is read right after
        by the layer's own backward (gᵀh). g and h are then freed as in a plain backward.
        """
        if record.received:
            raise RuntimeError(
                f"{self.owner}(mode='fused') records the gradient of one backward per training step, but the "
                f"output of layer '{label}' received a second gradient: `training_step` differentiates through "
                f"the model itself (`torch.autograd.grad`, a second `backward`). Use mode='recompute'."
            )
        h = record.input
        if len(calls) == 1 and h.ndim == 2:
            self._check(label, h, record.version)
            # the backward runs without grad mode (unless create_graph): no graph to detach from
            record.h_norm = torch.linalg.vector_norm(h if not torch.is_grad_enabled() else h.detach(), dim=1,
                                                     dtype=accumulation_dtype(h.dtype))
            record.g_norm = torch.linalg.vector_norm(grad, dim=1, dtype=accumulation_dtype(grad.dtype))
            record.input = None
        else:
            record.grad = grad.detach()

    def _check(self, label: str, h: Tensor, version: int) -> None:
        if tensor_version(h) != version:
            raise RuntimeError(
                f"{self.owner}(mode='fused'): the input of layer '{label}' was modified in place after the layer "
                f"ran, so its recorded activations are stale. Avoid in-place ops on layer inputs (e.g. `x += ...`), "
                f"or use mode='recompute'."
            )
        if h.shape[0] != self.batch:
            raise RuntimeError(
                f"{self.owner}(mode='fused'): layer '{label}' ran on an input of shape {tuple(h.shape)} whose "
                f"first dimension is not the batch of {self.batch}: per-sample norms need the batch first. "
                f"Use mode='recompute'."
            )

    def unused(self) -> list[str]:
        return [name for name, calls in self.calls.items() if not calls]

    def layer_norms(self) -> tuple[list[str], Tensor | None]:
        """Names and ‖∇_{θ_layer}‖ per row of the differentiated quantity, (B, L), of the layers that ran.

        The common case, every layer called once on a (B, d) input with weight and bias trainable, is the
        row norms the tensor hooks kept and two small operations for all layers together:
        ‖gᵢhᵢᵀ‖² + ‖gᵢ‖² = (‖gᵢ‖‖hᵢ‖)² + ‖gᵢ‖², a ``hypot``. Norms are taken in float32 for half-precision
        records (fp16 squares of scaled gradients overflow).
        """
        batch = self.batch
        names, g_norms, h_norms, general = [], [], [], []
        for name, calls in self.calls.items():
            if not calls:
                continue
            label = name or "_root"
            names.append(label)
            layer = self.layers[name]
            weight = layer.weight.requires_grad
            bias = layer.bias is not None and layer.bias.requires_grad
            if len(calls) == 1 and calls[0].g_norm is not None:  # one call on a (B, d) input: its row norms
                call = calls[0]
                if weight and bias:  # the common case, batched below
                    h_norms.append(call.h_norm)
                    g_norms.append(call.g_norm)
                    general.append(None)
                else:  # one of them frozen: ‖gᵢhᵢᵀ‖ = ‖gᵢ‖‖hᵢ‖ (the weight) or ‖gᵢ‖ (the bias)
                    general.append(call.g_norm * call.h_norm if weight else call.g_norm)
                continue
            reached = []
            for call in calls:
                self._check(label, call.input, call.version)
                if call.grad is not None:  # a call whose output did not reach the loss contributes nothing
                    reached.append((call.input.detach(), call.grad))
            if not reached:
                h0 = calls[0].input
                general.append(torch.zeros(batch, dtype=accumulation_dtype(h0.dtype), device=h0.device))
            else:
                h3 = torch.cat([upcast(h).reshape(batch, -1, h.shape[-1]) for h, _ in reached], dim=1)
                g3 = torch.cat([upcast(g).reshape(batch, -1, g.shape[-1]) for _, g in reached], dim=1)
                general.append(linear_squared_norms(h3, g3, weight=weight, bias=bias).sqrt())
        plain = len(g_norms)
        if plain:
            g = torch.stack(g_norms, dim=1)
            per_plain = torch.hypot(g * torch.stack(h_norms, dim=1), g)  # ‖gᵢ‖·√(‖hᵢ‖² + 1)
            if plain == len(general):
                return names, per_plain
            k = iter(per_plain.unbind(dim=1))
            general = [next(k) if c is None else c for c in general]
        return names, (torch.stack(general, dim=1) if general else None)
