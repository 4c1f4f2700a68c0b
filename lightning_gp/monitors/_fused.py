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
layers are hooked (:func:`_restrict_to_ghost_layers`), and plain Linear layers called once take the
direct ghost-norm formula :func:`~lightning_gp.functional.grad_norms.linear_squared_norms`; otherwise the
recorder hooks every module and computes as :func:`~lightning_gp.functional.per_sample_grad_norms_by_layer`
does. ``training_step`` is wrapped (:func:`install_tap`) so that the hooks are on exactly while the training
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
        self.recorder = GradNormRecorder(module)
        self.restricted = _restrict_to_ghost_layers(self.recorder)
        try:
            self.recorder.start()
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
        self.recorder.stop()
        if self._restore_grad:
            self.inputs.grad = None
            self.inputs.requires_grad_(False)
            self._restore_grad = False

    def finish(self, factor: float, owner: str) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-sample ``(‖∇ₓℓᵢ‖, {layer: ‖∇_{θ_layer} ℓᵢ‖²})`` of the micro-batch, then :meth:`close`."""
        try:
            batch = self.inputs.shape[0]
            if self.floating:
                if self.inputs.grad is None:
                    raise RuntimeError(
                        f"{owner}(mode='fused'): the loss does not depend on the batch input that `input_key` "
                        f"selects (its `.grad` stayed None after backward). Pass the `input_key` of the tensor "
                        f"`training_step` feeds the model, or use mode='recompute'."
                    )
                input_norms = torch.linalg.vector_norm(self.inputs.grad.reshape(batch, -1), dim=1, dtype=torch.float32)
                input_norms = input_norms * factor
            else:  # token ids: no input gradient, as in mode="recompute"
                input_norms = torch.full((batch,), math.nan, device=self.inputs.device)
            self.recorder.stop()
            unused = self._unused_layers(owner) if self.restricted else {}
            layers = _layer_squared_norms(self.recorder, batch, factor)
            layers.update({name: torch.zeros_like(input_norms) for name in unused})
            return input_norms, layers
        finally:
            self.close()


    def _unused_layers(self, owner: str) -> list[str]:
        """Drop the restricted recorder's layers that never ran (their per-sample norms are 0) and return
        their names; a layer whose parameters got a gradient without its forward running raises."""
        unused = [name for name, uses in self.recorder.uses.items() if not uses]
        for name in unused:
            module = self.recorder.modules.pop(name)
            del self.recorder.uses[name]
            if any(p.grad is not None for p in module.parameters(recurse=False)):
                raise RuntimeError(
                    f"{owner}(mode='fused'): the parameters of layer '{name}' ({type(module).__name__}) got a "
                    f"gradient although the layer's forward never ran (they are used directly by another "
                    f"module), so their per-sample norms were not recorded. Use mode='recompute'."
                )
        return [name or "_root" for name in unused]


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


def _layer_squared_norms(recorder: GradNormRecorder, batch: int, factor: float) -> dict[str, Tensor]:
    """The recorder's per-layer squared norms of the per-sample gradients (the recorded ones times ``factor``).

    Float16/bfloat16 records are brought to float32 first (scaled float16 gradients would overflow when
    squared); the factor is applied to the (B,) results, not to every recorded gradient.
    """
    fast = _plain_linear_units(recorder, batch)
    if fast is not None:  # the common case (an MLP): one call per Linear layer, no regrouping needed
        out = {}
        for name, (module, h, g) in fast.items():
            weight, bias = module.weight.requires_grad, module.bias is not None and module.bias.requires_grad
            out[name or "_root"] = linear_squared_norms(_float(h.detach()), _float(g), weight=weight, bias=bias)
    else:
        _check_versions(recorder.uses)  # before any input is replaced by a float32 copy below
        for uses in recorder.uses.values():
            for use in uses:
                use.grads = {i: _float(g) for i, g in use.grads.items()}
                use.args, use.kwargs = tree_map(_float, (use.args, use.kwargs))
                use.versions = [t._version for t in tree_flatten((use.args, use.kwargs))[0] if isinstance(t, Tensor)]
        out = recorder.layer_squared_norms(batch)
    return {k: v * factor**2 for k, v in out.items()}


def _plain_linear_units(recorder: GradNormRecorder, batch: int) -> dict[str, tuple[nn.Linear, Tensor, Tensor]] | None:
    """``{name: (layer, input, output gradient)}`` when every module owning trainable parameters is an
    ``nn.Linear`` called once, batch first, on a plain tensor; else None (the recorder's general path)."""
    out = {}
    for name, module in recorder.modules.items():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        uses = recorder.uses[name]
        if (type(module) is not nn.Linear or len(uses) != 1 or uses[0].kwargs or len(uses[0].args) != 1
                or not isinstance(uses[0].args[0], Tensor)):
            return None
        use = uses[0]
        if 0 not in use.grads:
            return None  # output did not reach the loss: let the general path give its zeros
        h, g = use.args[0], use.grads[0]
        if h.shape[0] != batch or g.shape[0] != batch or [h._version] != use.versions:
            return None  # the general path raises its clear error (batch not first, input modified in place)
        out[name] = (module, h, g)
    return out


def _float(value: object) -> object:
    if isinstance(value, Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value
