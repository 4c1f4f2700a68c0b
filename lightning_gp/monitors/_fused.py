"""Fused per-sample gradient norms: read them off the training step's own forward and backward.

The recorded gradients are those of ``loss · s / k`` (``k`` the ``accumulate_grad_batches``, ``s`` the
GradScaler's scale), so each is the per-sample gradient times ``s / (B·k)`` for a mean loss;
:func:`per_sample_factor` undoes that. All-Linear models take the light
:class:`~lightning_gp.functional._recorder.LinearTap`; others the general recorder. The recording starts at the top
of ``training_step``, called by the :class:`~lightning_gp.step.interception.StepInterceptor`. Design notes:
``docs/design/fused-monitor.md``.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

from lightning_gp.functional._layers import batch_norms
from lightning_gp.functional._norm_rules import UnbatchedLayer
from lightning_gp.functional._recorder import GradNormRecorder, LinearTap
from lightning_gp.functional._sharded import layer_type
from lightning_gp.functional.gradients import accumulation_dtype
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

    def __init__(self, module: torch.nn.Module, inputs: Tensor | None, batch: int, owner: str,
                 tap: LinearTap | None = None, target: nn.Module | None = None, mask: Tensor | None = None,
                 batch_tensors: list[Tensor] | None = None) -> None:
        self.inputs, self.batch = inputs, batch
        self.device = next((t.device for t in batch_tensors or []), torch.device("cpu")) if inputs is None \
            else inputs.device
        # With a target, ∇ is read off a zero δ added to the target's output (its `.grad` after backward), and the
        # batch's input (``inputs`` may be None) is not needed
        self.floating = target is None and inputs is not None and inputs.is_floating_point()
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
        self.recorder = GradNormRecorder(module, batch, batch_tensors) if layers is None else None
        self.restricted = layers is not None or self.recorder.restrict_to_closed_forms()
        try:
            if self.tap is not None:
                self.tap.start(batch)
            else:  # each layer measured in the backward as its gradients arrive, its records dropped then
                self.recorder.start().compute_eagerly(batch, upcast_records=True)
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
            batch = self.batch
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
                input_norms = torch.full((batch,), math.nan, device=self.device)
            if self.tap is not None:
                self.tap.stop()
                names, layers = self.tap.layer_norms()
                unused = check_unused(self.tap.layers, self.tap.unused(), owner)
            else:
                self.recorder.stop()
                unused = self._unused_layers(owner) if self.restricted else []
                try:
                    squared = self.recorder.layer_squared_norms(batch, upcast_records=True)
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
        unused = self.recorder.not_run()
        return check_unused(self.recorder.drop(unused), unused, owner)


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






def linear_layers(module: nn.Module) -> dict[str, nn.Module] | None:
    """``{name: layer}`` of the modules owning trainable parameters when all are plain ``nn.Linear`` (an MLP);
    None otherwise, and when a BatchNorm is in training mode (the general recorder then raises its error)."""
    if batch_norms(module):
        return None
    layers, seen = {}, set()
    for name, m in module.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            if layer_type(m) is not nn.Linear or any(id(p) in seen for p in m.parameters(recurse=False)):
                return None  # not a plain Linear, or tied weights (their uses add up): the general recorder
            seen.update(id(p) for p in m.parameters(recurse=False))
            layers[name] = m
    return layers or None







