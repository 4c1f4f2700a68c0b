"""Fused per-sample gradient norms: read them off the training step's own forward and backward.

:class:`~lightning_gp.functional.grad_norms.GradNormRecorder` keeps each layer's inputs and output
gradients during an ordinary forward/backward; the ghost norms it computes are those *of the quantity
that was differentiated*. In a Lightning step that quantity is ``loss · s / k``: ``loss`` the value
``training_step`` returned (the batch mean ``(1/B) Σᵢ ℓᵢ`` when ``loss_reduction="mean"``), ``k`` the
``accumulate_grad_batches`` Lightning divides by, ``s`` the GradScaler's scale under ``"16-mixed"``. So
every recorded gradient is the per-sample one times ``s / (B·k)`` (``s / k`` for a summed loss), and
:func:`per_sample_factor` undoes exactly that before the norms are formed. Samples must not interact
(no train-mode BatchNorm) for the recorded gradient of row i to be ∇ℓᵢ alone.

The recorded output gradients and inputs are brought to float32 before the norms: under ``16-mixed``
they are float16 and scaled by up to 2¹⁶, and their squared sums would overflow.

Cost. When every layer owning trainable parameters is a Linear/Conv layer (MLPs, CNNs), only those
layers are hooked (:func:`_restrict_to_ghost_layers`); when all of them are ``nn.Linear`` (an MLP) the light
:class:`LinearTap` records them and the norms of all layers are formed together; otherwise the recorder
hooks every module and computes as :func:`~lightning_gp.functional.per_sample_grad_norms_by_layer` does.
``training_step`` is wrapped (:func:`install_tap`) so that the hooks are on exactly while the training
step's forward runs, not during other callbacks' passes in ``on_train_batch_start``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from lightning_gp.functional.grad_norms import GradNormRecorder, _check_versions, linear_squared_norms

_TAP_ATTR = "_lightning_gp_fused_tap"


def install_tap(module: pl.LightningModule, start: Callable[[Any], None]) -> None:
    """Call ``start(batch)`` at the top of every ``training_step``, so the recording covers exactly the
    forward passes of the training step and not those other callbacks run in ``on_train_batch_start``.

    ``training_step`` becomes an instance attribute, as for the penalty callbacks
    (:mod:`lightning_gp.callbacks._base`): under DDP Lightning looks it up at call time, inside DDP's forward.
    """
    uninstall_tap(module)
    had_instance_attr = "training_step" in module.__dict__
    original = module.training_step

    @functools.wraps(original)  # Lightning reads the signature and ``__code__`` of training_step
    def training_step(*args: Any, **kwargs: Any) -> Any:
        start(args[0] if args else kwargs.get("batch"))
        return original(*args, **kwargs)

    module.__dict__[_TAP_ATTR] = (had_instance_attr, original)
    module.training_step = training_step


def uninstall_tap(module: pl.LightningModule) -> None:
    saved = module.__dict__.pop(_TAP_ATTR, None)
    if saved is None:
        return
    had_instance_attr, original = saved
    if had_instance_attr:
        module.training_step = original
    else:
        module.__dict__.pop("training_step", None)


def grad_scale(trainer: pl.Trainer) -> float:
    """The loss scale of the step's backward: the precision plugin's GradScaler scale, 1 without one."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    # The scale is only updated in the optimizer step, after on_after_backward: this is the one used.
    return float(scaler.get_scale())


def per_sample_factor(batch: int, accumulate: int, scale: float, reduction: str) -> float:
    """What turns a recorded gradient into the per-sample gradient ∇ℓᵢ (see the module docstring)."""
    return (batch if reduction == "mean" else 1) * accumulate / scale


class FusedRecording:
    """One micro-batch's recording: the input made a grad leaf and the recorder's hooks on the module.

    :meth:`close` restores everything (``requires_grad`` and ``.grad`` of the input, hooks) and is safe to
    call twice; the monitor calls it from ``on_after_backward``, ``on_train_batch_end`` and
    ``on_exception``.
    """

    def __init__(self, module: torch.nn.Module, inputs: Tensor, owner: str) -> None:
        self.inputs = inputs
        self.floating = inputs.is_floating_point()
        if self.floating and (not inputs.is_leaf or inputs.requires_grad):
            raise RuntimeError(
                f"{owner}(mode='fused') reads ∇ₓℓᵢ from the `.grad` of the batch's input, so the input must be "
                f"a batch tensor that does not require grad; got one with requires_grad="
                f"{inputs.requires_grad}, is_leaf={inputs.is_leaf} (computed by `input_key`, or prepared in a "
                f"hook?). Pass an `input_key` that returns the batch tensor itself, or use mode='recompute'."
            )
        # All parameterised layers are nn.Linear (an MLP): the light hooks of LinearTap, else the recorder's.
        layers = linear_layers(module)
        self.tap = LinearTap(layers) if layers is not None else None
        self.recorder = GradNormRecorder(module) if layers is None else None
        self.restricted = layers is not None or _restrict_to_ghost_layers(self.recorder)
        try:
            (self.tap or self.recorder).start()
        except ValueError as err:
            raise ValueError(
                f"{owner}(mode='fused') measures the training forward itself, where per-sample gradients must "
                f"be defined: {err} Use mode='recompute', which measures in eval mode."
            ) from err
        self._restore_grad = False
        if self.floating:
            inputs.requires_grad_(True)
            self._restore_grad = True

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.stop()
        if self.tap is not None:
            self.tap.stop()
        if self._restore_grad:
            self.inputs.grad = None
            self.inputs.requires_grad_(False)
            self._restore_grad = False

    def finish(self, factor: float, owner: str, per_layer: bool = True) -> tuple[Tensor, list[str]]:
        """The micro-batch's per-sample norms as one (B, 2 + L) matrix, then :meth:`close`.

        Columns: ‖∇ₓℓᵢ‖, ‖∇θℓᵢ‖ and, with ``per_layer``, ‖∇_{θ_layer} ℓᵢ‖ for each of the returned layer
        names. ``factor`` turns the recorded gradients into per-sample ones (:func:`per_sample_factor`); it is
        applied once, to the finished norms. The monitor reduces all columns in one metric update.
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
                grad = self.inputs.grad.reshape(batch, -1)
                input_norms = torch.linalg.vector_norm(grad, dim=1, dtype=_wide(grad.dtype))  # fp16: in float32
            else:  # token ids: no input gradient, as in mode="recompute"
                input_norms = torch.full((batch,), math.nan, device=self.inputs.device)
            if self.tap is not None:
                self.tap.stop()
                names, squared = self.tap.squared_norms(batch, owner)
                unused = check_unused(self.tap.layers, self.tap.unused(), owner)
            else:
                self.recorder.stop()
                unused = self._unused_layers(owner) if self.restricted else []
                layers = _layer_squared_norms(self.recorder, batch)
                names = list(layers)
                squared = torch.stack(list(layers.values()), dim=1) if layers else input_norms.new_zeros(batch, 0)
            if unused:  # layers that never ran: zero per-sample norms, under their own names
                names = [*names, *unused]
                squared = torch.cat([squared, squared.new_zeros(batch, len(unused))], dim=1)
            squared = squared.to(input_norms.dtype)
            parts = [input_norms[:, None], squared.sum(dim=1, keepdim=True)] + ([squared] if per_layer else [])
            columns = torch.cat(parts, dim=1)
            columns[:, 1:].sqrt_()
            return columns.mul_(factor), (names if per_layer else [])
        finally:
            self.close()

    def _unused_layers(self, owner: str) -> list[str]:
        """Drop the restricted recorder's layers that never ran (their per-sample norms are 0) and return
        their names; a layer whose parameters got a gradient without its forward running raises."""
        unused = [name for name, uses in self.recorder.uses.items() if not uses]
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


class LinearTap:
    """The fused recording of a model whose parameterised layers are all ``nn.Linear``: the light path.

    A forward hook per layer keeps the layer's input h and puts a tensor hook on its output for the output
    gradient g; nothing else is recorded (no per-module bookkeeping, no pytree walks: this runs on every
    monitored training step). A layer called several times (weights shared across calls or positions) has
    per-sample gradient Σ_calls gᵢhᵢᵀ: its calls are stacked along the sequence dimension, where
    :func:`~lightning_gp.functional.grad_norms.linear_squared_norms` already sums over positions.
    """

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.layers = layers
        #: name → one [input, its version at call time, output gradient or None] per call
        self.calls: dict[str, list[list]] = {name: [] for name in layers}
        self._handles: list = []

    def start(self) -> LinearTap:
        self.stop()
        self.calls = {name: [] for name in self.layers}
        for name, layer in self.layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(self.calls[name]), with_kwargs=True))
        return self

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, calls: list[list]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
            if not torch.is_grad_enabled() or not output.requires_grad:
                return  # a no-grad forward has no backward to record
            h = args[0] if args else kwargs["input"]
            record = [h, h._version, None]
            calls.append(record)
            self._handles.append(output.register_hook(functools.partial(_keep_grad, record)))

        return hook

    def unused(self) -> list[str]:
        return [name for name, calls in self.calls.items() if not calls]

    def squared_norms(self, batch: int, owner: str) -> tuple[list[str], Tensor]:
        """Layer names and ‖∇_{θ_layer}‖² per row of the differentiated quantity, (B, L), for the layers that ran.

        The common case, every layer called once on a (B, d) input with weight and bias trainable, takes two
        row norms per layer and a handful of (B, L) operations for all layers together: the monitor runs
        this on every monitored step, where each extra small kernel costs more than its arithmetic.
        """
        names, plain_g, plain_h, general = [], [], [], []
        for name, calls in self.calls.items():
            if not calls:
                continue
            layer = self.layers[name]
            reached = []
            for h, version, g in calls:
                if h._version != version:
                    raise RuntimeError(
                        f"{owner}(mode='fused'): the input of layer '{name or '_root'}' was modified in place after "
                        f"the layer ran, so its recorded activations are stale. Avoid in-place ops on layer inputs "
                        f"(e.g. `x += ...`), or use mode='recompute'."
                    )
                if h.shape[0] != batch:
                    raise RuntimeError(
                        f"{owner}(mode='fused'): layer '{name or '_root'}' ran on an input of shape "
                        f"{tuple(h.shape)} whose first dimension is not the batch of {batch}: per-sample norms "
                        f"need the batch first. Use mode='recompute'."
                    )
                if g is not None:  # a call whose output did not reach the loss contributes nothing
                    reached.append((h.detach(), g))
            names.append(name or "_root")
            weight = layer.weight.requires_grad
            bias = layer.bias is not None and layer.bias.requires_grad
            if len(reached) == 1 and reached[0][0].ndim == 2 and weight and bias:
                plain_g.append(reached[0][1])
                plain_h.append(reached[0][0])
                general.append(None)
                continue
            if not reached:
                h0 = calls[0][0]
                general.append(torch.zeros(batch, dtype=_wide(h0.dtype), device=h0.device))
                continue
            h3 = torch.cat([_float(h).reshape(batch, -1, h.shape[-1]) for h, _ in reached], dim=1)
            g3 = torch.cat([_float(g).reshape(batch, -1, g.shape[-1]) for _, g in reached], dim=1)
            general.append(linear_squared_norms(h3, g3, weight=weight, bias=bias))
        if plain_g:
            # ‖gᵢhᵢᵀ‖² + ‖gᵢ‖² = ‖gᵢ‖²(‖hᵢ‖² + 1) for every plain layer at once; norms in float32 (fp16 squares
            # of scaled gradients overflow).
            g_norm = torch.stack([torch.linalg.vector_norm(g, dim=1, dtype=_wide(g.dtype)) for g in plain_g], dim=1)
            h_norm = torch.stack([torch.linalg.vector_norm(h, dim=1, dtype=_wide(h.dtype)) for h in plain_h], dim=1)
            plain = g_norm.square_().mul_(h_norm.square_().add_(1.0))
            if all(c is None for c in general):
                return names, plain
            columns, k = [], 0
            for c in general:
                columns.append(plain[:, k] if c is None else c)
                k += c is None
            return names, torch.stack(columns, dim=1)
        if not general:
            return names, torch.zeros(batch, 0, device=next(iter(self.layers.values())).weight.device)  # none ran
        return names, torch.stack(general, dim=1)


def _keep_grad(record: list, grad: Tensor) -> None:
    record[2] = grad.detach() if record[2] is None else record[2] + grad.detach()


def linear_layers(module: nn.Module) -> dict[str, nn.Module] | None:
    """``{name: layer}`` of the modules owning trainable parameters when all are plain ``nn.Linear`` (an MLP);
    None otherwise, and when a BatchNorm is in training mode (the general recorder then raises its error).

    One pass over the modules, on every monitored step (cheaper than building the general recorder).
    """
    layers = {}
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            return None
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            if type(m) is not nn.Linear:
                return None
            layers[name] = m
    return layers or None


#: Layers whose per-sample norms need only their own inputs and output gradients (the ghost norm).
GHOST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)


def _restrict_to_ghost_layers(recorder: GradNormRecorder) -> bool:
    """Record only the layers owning trainable parameters when all of them are ghost-norm layers.

    Hooks on parameter-free modules (activations, containers, the LightningModule) are only needed to
    replay other layers through ``torch.func``; each one stores its output gradient, which keeps
    activation-sized buffers alive through the backward (≈10% of an MLP step on CPU). Not done when a
    train-mode BatchNorm is present, so that ``start`` still raises its error.
    """
    owners = {n: m for n, m in recorder.modules.items() if any(p.requires_grad for p in m.parameters(recurse=False))}
    batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in recorder.modules.values())
    if batchnorm or not all(type(m) in GHOST_LAYERS for m in owners.values()):
        return False
    recorder.modules = owners
    return True


def _layer_squared_norms(recorder: GradNormRecorder, batch: int) -> dict[str, Tensor]:
    """The general recorder's per-layer squared norms of the recorded per-sample gradients (CNNs, and models
    with layers other than Linear/Conv; all-Linear models take :class:`LinearTap`).

    Float16/bfloat16 records are brought to float32 first (scaled float16 gradients would overflow when
    squared).
    """
    _check_versions(recorder.uses)  # before any input is replaced by a float32 copy below
    for uses in recorder.uses.values():
        for use in uses:
            use.grads = {i: _float(g) for i, g in use.grads.items()}
            use.args, use.kwargs = tree_map(_float, (use.args, use.kwargs))
            use.versions = [t._version for t in tree_flatten((use.args, use.kwargs))[0] if isinstance(t, Tensor)]
    return recorder.layer_squared_norms(batch)


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision records (their squares overflow), the record's own dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _float(value: object) -> object:
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value
