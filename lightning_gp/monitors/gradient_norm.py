"""GradientNormMonitor: per-sample ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖, per layer, and the step's ‖∇θL‖."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gp.callbacks._batch import InputKey
from lightning_gp.functional._checks import check_per_sample
from lightning_gp.functional.grad_norms import per_sample_grad_norms_by_layer
from lightning_gp.loggers import define_summaries, log_histograms
from lightning_gp.metrics import PerSampleMeanMax
from lightning_gp.monitors._base import Monitor, isolated, logger_step
from lightning_gp.monitors._batch import default_loss, select_input

#: ``loss_fn(outputs, batch)`` → per-sample losses, shape (B,).
PerSampleLoss = Callable[[Tensor, Any], Tensor]

PREFIX = "grad_norm"


class GradientNormMonitor(Monitor):
    r"""Logs how sensitive the per-sample loss is to the input and to the parameters.

    For each sample i of the batch, with ℓᵢ its loss: ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖ (exact per-sample norms from
    :func:`lightning_gp.functional.per_sample_grad_norms`, at the cost of about one extra forward/backward
    pass), reduced to their mean and max over the samples of all DDP ranks; and ‖∇θL‖, the norm of the
    gradient the optimizer is about to apply (after DDP averaging and AMP unscaling, before clipping,
    penalties included).

    Logged, on every ``every_n_steps``-th optimizer step (default: the trainer's ``log_every_n_steps``):

    - ``grad_norm/input_mean``, ``grad_norm/input_max``: ‖∇ₓℓᵢ‖;
    - ``grad_norm/param_per_sample_mean``, ``grad_norm/param_per_sample_max``: ‖∇θℓᵢ‖;
    - ``grad_norm/layer/<layer name>``: mean over samples of ‖∇_{θ_layer} ℓᵢ‖ (with ``per_layer=True``);
    - ``grad_norm/param_batch``: ‖∇θL‖ (``grad_norm/param_batch/<k>`` for the k-th of several optimizers);
    - on W&B, histograms ``grad_norm/input`` and ``grad_norm/param_per_sample`` of rank 0's samples.

    **The per-sample loss.** A LightningModule's ``training_step`` returns a batch mean, which has no
    per-sample gradients; the monitor therefore recomputes ℓᵢ itself as ``loss_fn(module(x), batch)``,
    calling the module's ``forward`` on the batch's input (found by ``input_key``). The default
    ``loss_fn`` is cross-entropy with ``reduction="none"`` on an ``(x, y)`` batch (or a dict with
    ``"x"``/``"y"``). The measurement runs in eval mode on the parameters of the step, before the
    update, and leaves no trace on training (see :mod:`lightning_gp.monitors._base`).

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        input_key: the input in the batch: an index, a dict key, or a callable batch → input tensor;
            default a tensor batch itself, a tuple/list's first element, a dict's ``"x"``/``"input(s)"``.
        histograms: also log W&B histograms of the per-sample norms.
        loss_fn: ``(outputs, batch) -> per-sample losses (B,)``; default per-sample cross-entropy.
        per_layer: also log the per-layer per-sample norms.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> monitor = GradientNormMonitor(every_n_steps=50)  # then: Trainer(callbacks=[monitor])
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> values, _ = monitor.measure(net, x, (x, y))  # what it logs, here outside a Trainer
        >>> sorted(values)  # doctest: +NORMALIZE_WHITESPACE
        ['grad_norm/input_max', 'grad_norm/input_mean', 'grad_norm/layer/0', 'grad_norm/layer/2',
         'grad_norm/param_per_sample_max', 'grad_norm/param_per_sample_mean']
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        input_key: InputKey = None,
        histograms: bool = True,
        loss_fn: PerSampleLoss | None = None,
        per_layer: bool = True,
    ) -> None:
        super().__init__(every_n_steps)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable (outputs, batch) -> (B,), got {type(loss_fn).__name__}.")
        self.input_key = input_key
        self.histograms = bool(histograms)
        self.loss_fn = loss_fn or default_loss
        self.per_layer = bool(per_layer)
        self._metric: PerSampleMeanMax | None = None
        self._layer_names: list[str] | None = None
        self._pending: dict[str, Tensor] | None = None
        self._pending_step = -1
        self._global_step_at_start = -1

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        define_summaries(trainer, {f"{PREFIX}/input_max": "max", f"{PREFIX}/param_per_sample_max": "max"})

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and logger_step(trainer) != self._pending_step:
            self._flush(trainer)  # the due step never reached the optimizer: log what we have
        if not self._due(trainer):
            return
        self._pending_step = logger_step(trainer)
        self._global_step_at_start = trainer.global_step
        inputs = select_input(batch, self.input_key, type(self).__name__)
        per_sample, hist = self.measure(pl_module, inputs, batch)
        if self.histograms:
            log_histograms(trainer, hist, self._pending_step)
        self._pending = per_sample

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending is None:
            return
        # Lightning calls this hook with the gradients DDP has averaged and AMP has unscaled.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) if grads else None
        if norm is None:
            return
        key = f"{PREFIX}/param_batch"
        if len(trainer.optimizers) > 1:
            index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
            key = f"{key}/{index}"
        self._pending[key] = norm

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # With gradient accumulation, wait for the micro-batch whose optimizer step reads the gradients.
        if self._pending is not None and trainer.global_step != self._global_step_at_start:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, None
        self._log(trainer, pending, self._pending_step)

    def measure(self, pl_module: torch.nn.Module, inputs: Tensor, batch: Any) -> tuple[dict, dict]:
        """Per-sample norms on this batch, reduced over all ranks: ``({key: value}, {key: per-sample})``.

        Must be called on every rank at once under DDP (the reduction is a collective).
        """
        def per_sample_loss(outputs: Tensor) -> Tensor:
            return check_per_sample(self.loss_fn(outputs, batch), inputs.shape[0], "loss_fn(outputs, batch)")

        with isolated(pl_module):
            norms = per_sample_grad_norms_by_layer(pl_module, inputs, per_sample_loss)
        input_norms, param_norms = norms.input_norms, norms.param_norms
        layers = {k: v.sqrt() for k, v in norms.layer_squared_norms.items()} if self.per_layer else {}
        columns = [input_norms, param_norms, *layers.values()]
        metric = self._get_metric(len(columns), input_norms.device)
        metric.update(torch.stack([c.detach() for c in columns], dim=1))
        mean, maximum = metric.compute()
        metric.reset()
        out = {
            f"{PREFIX}/input_mean": mean[0],
            f"{PREFIX}/input_max": maximum[0],
            f"{PREFIX}/param_per_sample_mean": mean[1],
            f"{PREFIX}/param_per_sample_max": maximum[1],
        }
        out.update({f"{PREFIX}/layer/{name}": mean[2 + i] for i, name in enumerate(layers)})
        hist = {f"{PREFIX}/input": input_norms.detach(), f"{PREFIX}/param_per_sample": param_norms.detach()}
        return out, hist

    def _get_metric(self, num_values: int, device: torch.device) -> PerSampleMeanMax:
        if self._metric is None or self._metric.num_values != num_values:
            self._metric = PerSampleMeanMax(num_values)
        return self._metric.to(device)
