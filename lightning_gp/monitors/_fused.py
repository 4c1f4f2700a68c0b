"""Fused per-sample gradient norms: read them off the training step's own forward and backward.

The recorded gradients are those of ``loss · s / k`` (``k`` the ``accumulate_grad_batches``, ``s`` the
GradScaler's scale), so each is the per-sample gradient times ``s / (B·k)`` for a mean loss;
:func:`per_sample_factor` undoes that. All-Linear models take the light :class:`LinearTap`; others the
general recorder. The recording starts at the top of ``training_step``, called by the
:class:`~lightning_gp.interception.StepInterceptor`. Design notes: ``docs/design/fused-monitor.md``.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_gp.functional._layers import BATCH_NORM_LAYERS, batch_norms
from lightning_gp.functional._torch_private import tensor_version
from lightning_gp.functional.grad_norms import (
    GradNormRecorder,
    UnbatchedLayer,
    check_versions,
    closed_form_modules,
    linear_squared_norms,
    not_run,
    tensor_versions,
)
from lightning_gp.functional.gradients import accumulation_dtype, upcast
from lightning_gp.functional.layer_output import perturbed_output


def per_sample_factor(batch: int, accumulate: int, scale: float, reduction: str) -> float:
    """What turns a recorded gradient into the per-sample gradient ∇ℓᵢ (see the module docstring)."""
    return (batch if reduction == "mean" else 1) * accumulate / scale


class FusedRecording:
    """One micro-batch's recording: the input made a grad leaf and the recorder's hooks on the module.

    :meth:`close` restores everything (``requires_grad`` and ``.grad`` of the input, hooks) and is safe to
    call twice; the monitor calls it from ``on_after_backward``, ``on_train_batch_end`` and
    ``on_exception``.
    """

    def __init__(self, module: torch.nn.Module, inputs: Tensor, owner: str, tap: LinearTap | None = None,
                 target: nn.Module | None = None, mask: Tensor | None = None,
                 batch_tensors: list[Tensor] | None = None) -> None:
        self.inputs = inputs
        # With a target, ∇ is read off a zero δ added to the target's output (its `.grad` after backward)
        self.floating = target is None and inputs.is_floating_point()
        self._target = contextlib.ExitStack()
        self.output = None
        if self.floating and (not inputs.is_leaf or inputs.requires_grad):
            raise RuntimeError(
                f"{owner}(mode='fused') reads ∇ₓℓᵢ from the `.grad` of the batch's input, so the input must be "
                f"a batch tensor that does not require grad; got one with requires_grad="
                f"{inputs.requires_grad}, is_leaf={inputs.is_leaf} (computed by `input_key`, or prepared in a "
                f"hook?). Pass an `input_key` that returns the batch tensor itself, or use mode='recompute'."
            )
        # All parameterised layers are nn.Linear (an MLP): the light hooks of LinearTap, else the recorder's.
        # ``tap``, the previous step's, is reused while the layers are the same ones (its hooks are still on).
        layers = linear_layers(module)
        if tap is not None and tap.layers != layers:
            tap.remove()
            tap = None
        self.tap = (tap or LinearTap(layers, owner)) if layers is not None else None
        self.recorder = GradNormRecorder(module, inputs.shape[0], batch_tensors) if layers is None else None
        self.restricted = layers is not None or _restrict_to_closed_forms(self.recorder)
        try:
            self.tap.start(inputs.shape[0]) if self.tap is not None else self.recorder.start()
        except ValueError as err:
            raise ValueError(
                f"{owner}(mode='fused') measures the training forward itself, where per-sample gradients must "
                f"be defined: {err} Use mode='recompute', which measures in eval mode."
            ) from err
        self._restore_grad = False
        if self.floating:
            inputs.requires_grad_(True)
            self._restore_grad = True
        if target is not None:
            self.output = self._target.enter_context(perturbed_output(target, mask=mask, owner=f"{owner}(target=...)"))

    def close(self) -> None:
        """End the recording; a :class:`LinearTap` keeps its (inactive) forward hooks for the next step."""
        if self.recorder is not None:
            self.recorder.stop()
        if self.tap is not None:
            self.tap.stop()
            self.tap.clear()
        if self._restore_grad:
            self.inputs.grad = None
            self.inputs.requires_grad_(False)
            self._restore_grad = False
        self._target.close()

    def finish(self, owner: str, per_layer: bool = True) -> tuple[Tensor, list[str]]:
        """The micro-batch's norms of the recorded gradients as one (B, 2 + L) matrix, then :meth:`close`.

        Columns: ‖∇ₓ‖, ‖∇θ‖ and, with ``per_layer``, ‖∇_{θ_layer}‖ for each of the returned layer names, of the
        differentiated quantity: the monitor multiplies them by :func:`per_sample_factor` to get the
        per-sample norms (on the reduced values where it can, one kernel less per step).
        """
        try:
            batch = self.inputs.shape[0]
            if self.floating:
                if self.inputs.grad is None:
                    raise RuntimeError(
                        f"{owner}(mode='fused'): the loss does not depend on the batch input that `input_key` "
                        f"selects (its `.grad` stayed None after backward). Pass the `input_key` of the tensor "
                        f"`training_step` feeds the model, or use mode='recompute'."
                    )
                grad = self.inputs.grad
                grad = grad if grad.ndim == 2 else grad.reshape(batch, -1)
                # fp16: in float32
                input_norms = torch.linalg.vector_norm(grad, dim=1, dtype=accumulation_dtype(grad.dtype))
            elif self.output is not None:  # ∇ w.r.t. the target's output: the `.grad` of the zero δ added to it
                self._target.close()
                if self.output.calls == 0 or self.output.delta.grad is None:
                    raise RuntimeError(
                        f"{owner}(mode='fused'): the loss does not depend on the output of `target` (it "
                        f"{'did not run' if self.output.calls == 0 else 'got no gradient'} in `training_step`)."
                    )
                grad = self.output.delta.grad
                grad = grad.reshape(batch, -1)
                input_norms = torch.linalg.vector_norm(grad, dim=1, dtype=accumulation_dtype(grad.dtype))
            else:  # token ids: no input gradient, as in mode="recompute"
                input_norms = torch.full((batch,), math.nan, device=self.inputs.device)
            if self.tap is not None:
                self.tap.stop()
                names, layers = self.tap.layer_norms()
                unused = check_unused(self.tap.layers, self.tap.unused(), owner)
            else:
                self.recorder.stop()
                unused = self._unused_layers(owner) if self.restricted else []
                try:
                    squared = _layer_squared_norms(self.recorder, batch)
                except UnbatchedLayer as err:
                    raise ValueError(
                        f"{owner}(mode='fused') reads per-sample norms off the training step's own backward, which "
                        f"needs every layer to keep the samples apart in its batch dimension: {err} Use "
                        f"mode='recompute', which measures any model exactly (a batched backward where a layer "
                        f"does not)."
                    ) from err
                names = list(squared)
                layers = torch.stack(list(squared.values()), dim=1).sqrt() if squared else None
            if unused:  # layers that never ran: zero per-sample norms, under their own names
                names = [*names, *unused]
                zeros = input_norms.new_zeros(batch, len(unused))
                layers = zeros if layers is None else torch.cat([layers, zeros.to(layers.dtype)], dim=1)
            if layers is None:
                layers = input_norms.new_zeros(batch, 0)
            total = torch.linalg.vector_norm(layers, dim=1)  # ‖∇θ‖² = Σ over layers of ‖∇_{θ_layer}‖²
            if not per_layer:
                return torch.stack([input_norms, total], dim=1), []
            return torch.column_stack([input_norms, total, layers]), names
        finally:
            self.close()

    def _unused_layers(self, owner: str) -> list[str]:
        """Drop the restricted recorder's layers that never ran (their per-sample norms are 0) and return
        their names; a layer whose parameters got a gradient without its forward running raises."""
        unused = not_run(self.recorder)
        modules = {name: self.recorder.modules.pop(name) for name in unused}
        for name in unused:
            del self.recorder.uses[name]
        return check_unused(modules, unused, owner)


def check_unused(modules: dict[str, nn.Module], unused: list[str], owner: str) -> list[str]:
    """The display names of the layers that never ran; raises if one of them got a gradient all the same."""
    for name in unused:
        module = modules[name]
        if any(p.grad is not None for p in module.parameters(recurse=False)):
            raise RuntimeError(
                f"{owner}(mode='fused'): the parameters of layer '{name}' ({type(module).__name__}) got a "
                f"gradient although the layer's forward never ran (they are used directly by another "
                f"module), so their per-sample norms were not recorded. Use mode='recompute'."
            )
    return [name or "_root" for name in unused]


@dataclass
class LayerCall:
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


class LinearTap:
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
        self.calls: dict[str, list[LayerCall]] = {name: [] for name in layers}
        self.recording = False
        self.batch = 0
        self._forward_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._grad_handles: list[torch.utils.hooks.RemovableHandle] = []

    def start(self, batch: int) -> LinearTap:
        """Record the coming forward/backward of a batch of ``batch`` samples."""
        self.stop()
        self.clear()
        self.batch = batch
        self.recording = True
        if not self._forward_handles:
            for name, layer in self.layers.items():
                self._forward_handles.append(layer.register_forward_hook(self._forward_hook(name or "_root", layer)))
        return self

    def stop(self) -> None:
        """End the step's recording: no more records, the tensor hooks removed (the forward hooks stay)."""
        self.recording = False
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles.clear()

    def clear(self) -> None:
        """Drop the records (they hold activations)."""
        for calls in self.calls.values():
            calls.clear()

    def remove(self) -> None:
        """Stop, drop the records and remove the forward hooks."""
        self.stop()
        self.clear()
        for handle in self._forward_handles:
            handle.remove()
        self._forward_handles.clear()

    def _forward_hook(self, label: str, layer: nn.Module) -> Callable[..., None]:
        calls = self.calls[next(name for name, m in self.layers.items() if m is layer)]

        # Run eagerly under torch.compile: the tensor hook it registers cannot be traced (a side effect on
        # Python state), so the graph breaks here anyway; disabled, the bookkeeping adds no graphs of its own.
        @torch.compiler.disable
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            # `module is layer`: a deep copy of the model copies this hook; its calls are not recorded
            if module is layer and self.recording and torch.is_grad_enabled() and output.requires_grad:
                h = args[0]
                record = LayerCall(input=h, version=tensor_version(h))
                calls.append(record)
                handle = output.register_hook(functools.partial(self._on_grad, label, calls, record))
                self._grad_handles.append(handle)

        return hook

    def _on_grad(self, label: str, calls: list[LayerCall], record: LayerCall, grad: Tensor) -> None:
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


def linear_layers(module: nn.Module) -> dict[str, nn.Module] | None:
    """``{name: layer}`` of the modules owning trainable parameters when all are plain ``nn.Linear`` (an MLP);
    None otherwise, and when a BatchNorm is in training mode (the general recorder then raises its error)."""
    if batch_norms(module):
        return None
    layers, seen = {}, set()
    for name, m in module.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            if type(m) is not nn.Linear or any(id(p) in seen for p in m.parameters(recurse=False)):
                return None  # not a plain Linear, or tied weights (their uses add up): the general recorder
            seen.update(id(p) for p in m.parameters(recurse=False))
            layers[name] = m
    return layers or None





def _restrict_to_closed_forms(recorder: GradNormRecorder) -> bool:
    """Hook only the modules :func:`closed_form_modules` names when every trainable parameter has a closed-form
    rule (Linear, Conv, norm layers, Embedding, MultiheadAttention); hooks on parameter-free modules are only
    needed to replay other layers through ``torch.func``. Not done when a train-mode BatchNorm is present, so
    that ``start`` still raises its error.
    """
    if any(isinstance(m, BATCH_NORM_LAYERS) and m.training for m in recorder.modules.values()):
        return False
    keep = closed_form_modules(recorder.modules)
    if keep is None:
        return False
    recorder.modules = keep
    return True


def _layer_squared_norms(recorder: GradNormRecorder, batch: int) -> dict[str, Tensor]:
    """The general recorder's per-layer squared norms of the recorded per-sample gradients (every model but
    the all-Linear ones, which take :class:`LinearTap`).

    Float16/bfloat16 records are brought to float32 first (scaled float16 gradients would overflow when
    squared).
    """
    check_versions(recorder.uses)  # before any input is replaced by a float32 copy below
    for uses in recorder.uses.values():
        for use in uses:
            use.grads = {i: upcast(g) for i, g in use.grads.items()}
            use.args, use.kwargs = apply_to_collection((use.args, use.kwargs), Tensor, upcast)
            use.versions = tensor_versions((use.args, use.kwargs))
    return recorder.layer_squared_norms(batch)
