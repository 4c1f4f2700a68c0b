"""GradientNormMonitor: per-sample ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖, per layer, and the step's ‖∇θL‖."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gp._arguments import check_choice
from lightning_gp._batch import InputKey, resolve_input
from lightning_gp._log_writer import define_summaries, gathered_rows, has_wandb, log_histograms, log_scatter
from lightning_gp._logging import logger_step
from lightning_gp._objective import REDUCTIONS, Reduction
from lightning_gp._setup_checks import check_forward
from lightning_gp._site import Site, Target
from lightning_gp._trainer import loss_scale
from lightning_gp.functional._checks import check_per_sample
from lightning_gp.functional._recorder import LinearTap
from lightning_gp.functional._sharded import is_sharded, local
from lightning_gp.functional._torch_private import tree_flatten
from lightning_gp.functional.grad_norms import per_sample_grad_norms_by_layer
from lightning_gp.functional.gradients import tensor_norms
from lightning_gp.functional.layer_output import per_sample_output_gradient_norms
from lightning_gp.interception import StepInterceptor
from lightning_gp.monitors._base import Monitor, isolated
from lightning_gp.monitors._batch import default_loss
from lightning_gp.monitors._fused import FusedRecording, per_sample_factor

#: ``loss_fn(outputs, batch)`` → per-sample losses, shape (B,).
PerSampleLoss = Callable[[Tensor, Any], Tensor]

PREFIX = "grad_norm"
#: How the monitor measures (see the class docstring).
Mode = Literal["recompute", "fused"]
MODES: tuple[str, ...] = get_args(Mode)


class GradientNormMonitor(Monitor):
    r"""Logs how sensitive the per-sample loss is to the input and to the parameters.

    Per sample i, ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖ as mean and max over all ranks' samples (``grad_norm/input_mean``, ``_max``,
    ``param_per_sample_mean``, ``_max``; ``grad_norm/layer/<name>``) and the step's ‖∇θL‖ (``param_batch``:
    after DDP averaging and AMP unscaling, before clipping), every ``every_n_steps``-th optimizer step, with
    ``<key>_epoch`` aggregates in ``callback_metrics``. Modes, costs, fused-mode limits: ``docs/monitors.md``.

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        input_key: the input in the batch: an index, a dict key, or a callable batch → input tensor.
        histograms: also log W&B media of the per-sample norms: histograms and a table with a scatter of ‖∇ₓℓᵢ‖
            against ‖∇θℓᵢ‖, over all ranks' samples.
        media_every_n_steps: the media at most every this many steps (default: 10 × ``every_n_steps``).
        loss_fn: ``(outputs, batch) -> per-sample losses (B,)``; default per-sample cross-entropy.
        per_layer: also log the per-layer per-sample norms.
        mode: ``"recompute"`` (a separate eval-mode pass of ``loss_fn``) or ``"fused"`` (the step's own).
        loss_reduction: fused mode: ``"mean"`` or ``"sum"``, how ``training_step`` reduces the ℓᵢ.
        target: take ‖∇ℓᵢ‖ w.r.t. this layer's output (dotted path or module), e.g. a token model's embeddings.
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).

    Raises:
        ValueError: an unknown ``mode`` or ``loss_reduction``, or a ``loss_fn`` with ``mode="fused"``.
        RuntimeError: in ``setup``: an unsupported strategy; fused mode with manual optimization or a penalty.

    Example::

        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> monitor = GradientNormMonitor(every_n_steps=50)  # then: Trainer(callbacks=[monitor])
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> values, _ = monitor.measure(net, x, (x, y))  # what it logs, here outside a Trainer
        >>> sorted(values)  # doctest: +NORMALIZE_WHITESPACE
        ['grad_norm/input_max', 'grad_norm/input_mean', 'grad_norm/layer/0', 'grad_norm/layer/2',
         'grad_norm/param_per_sample_max', 'grad_norm/param_per_sample_mean']
        >>> fused = GradientNormMonitor(every_n_steps=1, mode="fused")  # every step: Trainer(callbacks=[fused])
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        input_key: InputKey = None,
        histograms: bool = True,
        loss_fn: PerSampleLoss | None = None,
        per_layer: bool = True,
        mode: Mode = "recompute",
        loss_reduction: Reduction = "mean",
        target: Target = None,
        mask_key: str | None = None,
        media_every_n_steps: int | None = None,
    ) -> None:
        super().__init__(every_n_steps, media_every_n_steps)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable (outputs, batch) -> (B,), got {type(loss_fn).__name__}.")
        check_choice(mode, "mode", MODES, type(self).__name__)
        check_choice(loss_reduction, "loss_reduction", REDUCTIONS, type(self).__name__)
        if mode == "fused" and loss_fn is not None:
            raise ValueError(
                "`loss_fn` is not used with mode='fused' (the per-sample losses are those of `training_step`); "
                "drop it, or use mode='recompute' to measure `loss_fn`."
            )
        self.mode = mode
        self.target, self.mask_key = target, mask_key
        self.site = Site(target, input_key, mask_key, type(self).__name__)
        self.loss_reduction = loss_reduction
        self.input_key = input_key
        self.histograms = bool(histograms)
        self.loss_fn = loss_fn  # None: default_loss (kept as given, for the repr)
        self.per_layer = bool(per_layer)
        self._pending: dict[str, Tensor] | None = None
        self._pending_step = -1
        self._global_step_at_start = -1
        # fused mode: the open recording of the current micro-batch, and the per-sample columns collected
        self._recording: FusedRecording | None = None
        self._linear_tap: LinearTap | None = None  # kept over consecutive monitored steps (see LinearTap)
        self._armed = False  # the next training_step is a micro-batch of a due step
        self._module: pl.LightningModule | None = None
        #: per micro-batch: (B, 2 + L) norms of the recorded gradients, layer names, per-sample factor
        self._columns: list[tuple[Tensor, list[str], float]] = []

    @override
    def unsupported_when_sharded(self) -> str | None:
        return None  # the per-sample forms need only activations and output gradients, never a whole weight

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.site.resolve(pl_module)
        if self.mode == "recompute":
            check_forward(pl_module, f"{type(self).__name__}(mode='recompute')",
                          "Define `forward(self, x)` returning the outputs its per-sample loss takes (the logits), "
                          "or use mode='fused', which measures `training_step` itself.")
        if self.mode != "fused" or stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{name}(mode='fused') reads the gradients of Lightning's automatic-optimization backward; "
                f"`{type(pl_module).__name__}` uses manual optimization. Use mode='recompute'."
            )
        penalties = [type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "adds_to_loss", False)]
        if penalties:
            raise RuntimeError(
                f"{name}(mode='fused') measures the backward of the loss `training_step` returns, but "
                f"{', '.join(penalties)} add(s) a penalty to it (and run extra passes), so the recorded "
                f"gradients are not those of the per-sample losses. Use mode='recompute'."
            )
        self._module = pl_module
        StepInterceptor.attach(trainer, pl_module).observe(self._tap)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        define_summaries(trainer, {f"{PREFIX}/input_max": "max", f"{PREFIX}/param_per_sample_max": "max"})

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None and logger_step(trainer) != self._pending_step:
            self._flush(trainer)  # the due step never reached the optimizer: log what we have
        if self.mode == "fused":
            self._fused_start(trainer, pl_module, batch)
            return
        if not self._due(trainer):
            return
        self._pending_step = logger_step(trainer)
        self._global_step_at_start = trainer.global_step
        inputs = resolve_input(batch, self.input_key, type(self).__name__, computed=True)[0]
        per_sample, hist = self.measure(pl_module, inputs, batch)
        self._log_media(trainer, hist, self._pending_step)
        self._pending = per_sample

    def _fused_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._close()  # a recording whose backward never came (training_step returned None)
        if self._due(trainer):
            self._pending_step = logger_step(trainer)
            self._global_step_at_start = trainer.global_step
            self._pending, self._columns = {}, []
        # every micro-batch of a due step is recorded: all samples behind that optimizer step
        self._armed = self._pending is not None and logger_step(trainer) == self._pending_step
        if not self._armed:
            self._remove_tap()  # the hooks stay on only over consecutive monitored steps

    def _tap(self, batch: Any) -> None:
        """Start of ``training_step`` (called by the interceptor): record if this micro-batch is due."""
        if not self._armed:
            return
        self._armed = False
        self._close()
        inputs = resolve_input(batch, self.input_key, type(self).__name__, computed=True)[0]
        mask = self.site.mask(batch) if self.site.module is not None else None
        self._recording = FusedRecording(self._module, inputs, type(self).__name__, self._linear_tap,
                                         target=self.site.module, mask=mask,
                                         batch_tensors=[t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)])
        self._linear_tap = self._recording.tap

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        batch = recording.inputs.shape[0]
        factor = per_sample_factor(batch, trainer.accumulate_grad_batches, loss_scale(trainer), self.loss_reduction)
        # One (B, 2 + L) matrix [‖∇ₓℓᵢ‖, ‖∇θℓᵢ‖, per-layer norms] / factor: reduced in one metric update.
        self._columns.append((*recording.finish(type(self).__name__, self.per_layer), factor))

    def _close(self) -> None:
        self._armed = False
        if self._recording is not None:
            recording, self._recording = self._recording, None
            recording.close()

    def _remove_tap(self) -> None:
        if self._linear_tap is not None:
            tap, self._linear_tap = self._linear_tap, None
            tap.remove()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()
        self._remove_tap()
        self._pending, self._columns = None, []
        self._unobserve(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()
        self._remove_tap()
        self._unobserve(pl_module)
        self._module = None

    def _unobserve(self, pl_module: pl.LightningModule) -> None:
        interceptor = StepInterceptor.of(pl_module)
        if interceptor is not None:
            interceptor.unobserve(self._tap)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._pending is None:
            return
        # Lightning calls this hook with the gradients DDP has averaged and AMP has unscaled.
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        key = f"{PREFIX}/param_batch"
        if len(trainer.optimizers) > 1:
            index = next((i for i, o in enumerate(trainer.optimizers) if o is optimizer), 0)
            key = f"{key}/{index}"
        # ‖∇θL‖ is the norm of the per-parameter norms (one foreach kernel); that last norm is taken on the
        # host in _flush, with the other values (one transfer a step)
        if any(is_sharded(g) for g in grads):  # FSDP2: each rank holds shards; one sum of squares over the ranks
            square = tensor_norms([local(g) for g in grads]).square().sum()
            self._pending[key] = trainer.strategy.reduce(square, reduce_op="sum").sqrt().reshape(1)
        else:
            self._pending[key] = tensor_norms(grads)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._close()
        # With gradient accumulation, wait for the micro-batch whose optimizer step reads the gradients.
        if self._pending is not None and trainer.global_step != self._global_step_at_start:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        pending, self._pending = self._pending, None
        # pending: {param_batch key: per-parameter gradient norms (P,)}, and the reduced per-sample values of
        # mode="recompute" (floats)
        keys = [k for k, v in pending.items() if isinstance(v, Tensor)]
        norms = [pending.pop(k) for k in keys]
        if self.mode == "fused" and self._columns:
            columns, self._columns = self._columns, []
            factors = {factor for _, _, factor in columns}
            if len(factors) == 1:  # mean and max commute with the factor: it is applied to the reduced values
                (factor,) = factors
                matrix = columns[0][0] if len(columns) == 1 else torch.cat([c[0] for c in columns])
            else:  # micro-batches of different sizes (the last of an epoch): each row gets its own factor
                factor, matrix = 1.0, torch.cat([m * f for m, _, f in columns])
            values, flat = self._reduce_columns(matrix, columns[0][1], norms, factor)
            pending = {**values, **pending}
            self._log_media(trainer, _histograms(matrix * factor), self._pending_step)
        else:
            flat = torch.cat(norms).tolist() if norms else []
        start = 0
        for key, n in zip(keys, norms, strict=True):
            pending[key] = math.hypot(*flat[start : start + n.shape[0]])  # ‖∇θL‖ from per-parameter norms
            start += n.shape[0]
        self._log(trainer, pending, self._pending_step)

    def _log_media(self, trainer: pl.Trainer, hist: dict[str, Tensor], step: int) -> None:
        """On a media step, every rank's per-sample norms as W&B histograms and a table with a scatter chart (the
        gather is a collective: every rank takes the same decision)."""
        if not (self.histograms and has_wandb(trainer) and self._media_due(step)):
            return
        rows = gathered_rows(trainer, torch.stack(list(hist.values()), dim=1))
        log_histograms(trainer, dict(zip(hist, rows.unbind(dim=1), strict=True)), step)
        log_scatter(trainer, f"{PREFIX}/input_vs_param", ("input", "param_per_sample"), rows, step,
                    title="‖∇ₓℓᵢ‖ against ‖∇θℓᵢ‖")

    def measure(self, pl_module: torch.nn.Module, inputs: Tensor, batch: Any) -> tuple[dict, dict]:
        """Per-sample norms on this batch, reduced over all ranks: ``({key: value}, {key: per-sample})``.

        Must be called on every rank at once under DDP (the reduction is a collective).
        """
        def per_sample_loss(outputs: Tensor) -> Tensor:
            return check_per_sample((self.loss_fn or default_loss)(outputs, batch), inputs.shape[0],
                                    "loss_fn(outputs, batch)")

        if not self.site.resolved:
            self.site.resolve(pl_module)
        if self.site.module is None and not inputs.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}: the input selected by `input_key={self.input_key!r}` has dtype {inputs.dtype} "
                f"(token ids? labels?), so ‖∇ₓℓᵢ‖ does not exist. Pass the floating-point input's `input_key`, or "
                f"`target=` the layer whose output to differentiate (the embedding layer of a token model)."
            )
        with isolated(pl_module):
            norms = per_sample_grad_norms_by_layer(pl_module, inputs, per_sample_loss)
            input_norms = norms.input_norms
            if self.site.module is not None:  # ‖∇ℓᵢ‖ w.r.t. the target's output: one more forward/backward
                input_norms = per_sample_output_gradient_norms(
                    lambda: per_sample_loss(pl_module(inputs)).sum(), self.site.module, mask=self.site.mask(batch))
        layers = {k: v.sqrt() for k, v in norms.layer_squared_norms.items()} if self.per_layer else {}
        return self._reduce(input_norms, norms.param_norms, layers)

    def _reduce(self, input_norms: Tensor, param_norms: Tensor, layers: dict[str, Tensor]) -> tuple[dict, dict]:
        """Mean and max over the samples of all ranks (a collective under DDP), and rank 0's histograms."""
        columns = torch.stack([c.detach() for c in (input_norms, param_norms, *layers.values())], dim=1)
        return self._reduce_columns(columns, list(layers))[0], _histograms(columns)

    def _reduce_columns(
        self, columns: Tensor, layer_names: list[str], extra: list[Tensor] = (), factor: float = 1.0
    ) -> tuple[dict[str, float], list[float]]:
        """:meth:`_reduce` of a (B, 2 + L) matrix [‖∇ₓℓᵢ‖, ‖∇θℓᵢ‖, one column per layer of ``layer_names``]
        times ``factor`` (> 0: mean and max scale with it).

        Also brings the 1-d tensors ``extra`` to the host in the same transfer, returned concatenated.
        """
        mean, maximum = self._reduce_per_sample(columns)
        k = mean.shape[0]
        flat = torch.cat([mean, maximum, *extra]).tolist()  # one host transfer for all the scalars
        mean, maximum = [v * factor for v in flat[:k]], [v * factor for v in flat[k : 2 * k]]
        out = {
            f"{PREFIX}/input_mean": mean[0],
            f"{PREFIX}/input_max": maximum[0],
            f"{PREFIX}/param_per_sample_mean": mean[1],
            f"{PREFIX}/param_per_sample_max": maximum[1],
        }
        out.update({f"{PREFIX}/layer/{name}": mean[2 + i] for i, name in enumerate(layer_names)})
        return out, flat[2 * k :]


def _histograms(columns: Tensor) -> dict[str, Tensor]:
    """The per-sample values W&B histograms show: ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖ (columns 0 and 1)."""
    return {f"{PREFIX}/input": columns[:, 0], f"{PREFIX}/param_per_sample": columns[:, 1]}
