"""GradientNormMonitor: per-sample ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖, per layer, and the step's ‖∇θL‖."""

from __future__ import annotations

import math
from typing import Any, Literal, get_args

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gp._lightning.log_writer import define_summaries, gathered_rows, has_wandb, log_histograms, log_scatter
from lightning_gp._lightning.logging import logger_step
from lightning_gp._lightning.setup_checks import check_forward
from lightning_gp._lightning.trainer import attached_trainer, loss_scale
from lightning_gp.functional._checks import check_bool, check_choice, check_per_sample
from lightning_gp.functional._norm_rules import UnbatchedLayer
from lightning_gp.functional._recorder import LinearTap
from lightning_gp.functional._sharded import is_sharded, local
from lightning_gp.functional._torch_private import tree_flatten
from lightning_gp.functional.grad_norms import (
    PerSampleGradNorms,
    per_sample_grad_norms_by_layer,
    per_sample_grad_norms_of_loss,
)
from lightning_gp.functional.gradients import per_sample_norm, tensor_norms
from lightning_gp.functional.layer_output import perturbed_output
from lightning_gp.monitors._base import Monitor, isolated
from lightning_gp.monitors._batch import default_loss
from lightning_gp.monitors._fused import FusedRecording, per_sample_factor
from lightning_gp.monitors._pass import (
    ForwardFn,
    MonitorPass,
    PerSampleLoss,
    SkipBatch,
    batch_size,
    check_implicit_forward,
    tensor_entries,
)
from lightning_gp.step._batch import InputKey, replace_input, resolve_input
from lightning_gp.step._objective import REDUCTIONS, Reduction
from lightning_gp.step._site import Site, Target, not_run_error
from lightning_gp.step.interception import StepInterceptor

PREFIX = "grad_norm"
#: How the monitor measures (see the class docstring).
Mode = Literal["recompute", "fused"]
MODES: tuple[str, ...] = get_args(Mode)


class GradientNormMonitor(Monitor):
    r"""Logs how sensitive the per-sample loss is to the input and to the parameters.

    Per sample i, ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖ as mean and max over all ranks' samples (``grad_norm/input_mean``, ``_max``,
    ``param_per_sample_mean``, ``_max``; ``grad_norm/layer/<name>``) and the step's ‖∇θL‖ (``param_batch``:
    after DDP averaging and AMP unscaling, before clipping), every ``every_n_steps``-th optimizer step, with
    ``<key>_epoch`` aggregates in ``callback_metrics``. ℓᵢ is sample i's share of the loss of ``training_step``,
    re-run in eval mode on the step's batch (masks included), or ``loss_fn`` of ``forward_fn``'s outputs. Modes,
    costs, Hugging Face recipes: [Monitors](../monitors.md).

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        input_key: the input in the batch: an index, a dict key, or a callable batch → input tensor.
        histograms: also log W&B histograms of the per-sample norms and a scatter of ‖∇ₓℓᵢ‖ against ‖∇θℓᵢ‖.
        media_every_n_steps: the media at most every this many steps (default: 10 × ``every_n_steps``).
        loss_fn: ``(outputs, batch) -> (B,)`` per-sample losses of ``forward_fn``'s outputs (default cross-entropy).
        forward_fn: ``(module, batch) -> outputs``, the model as ``training_step`` calls it.
        per_layer: also log each layer's mean per-sample norm, one key a layer (off: hundreds on a real model).
        mode: ``"recompute"`` (a separate eval-mode pass) or ``"fused"`` (the step's own backward).
        loss_reduction: ``"mean"`` or ``"sum"``, how ``training_step`` reduces the ℓᵢ (checked once).
        target: take ‖∇ℓᵢ‖ w.r.t. this layer's output (dotted path or module), e.g. a token model's embeddings.
        mask_key: a (B, T) mask of real positions (default ``"attention_mask"`` of a dict batch).
        check_reduction: check ``loss_reduction`` on the two half-batches of the first measurement.

    Raises:
        ValueError: a bad argument; RuntimeError: in ``setup``, manual optimization, fused mode beside a penalty.

    Example:


        >>> from lightning.pytorch.demos.boring_classes import BoringModel  # training_step: a mean loss of self(batch)
        >>> monitor = GradientNormMonitor(every_n_steps=50)  # then: Trainer(callbacks=[monitor])
        >>> values, _ = monitor.measure(BoringModel(), torch.randn(8, 32))  # what it logs, here outside a Trainer
        >>> sorted(values)  # doctest: +NORMALIZE_WHITESPACE
        ['grad_norm/input_max', 'grad_norm/input_mean', 'grad_norm/param_per_sample_max',
         'grad_norm/param_per_sample_mean']
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        input_key: InputKey = None,
        histograms: bool = True,
        loss_fn: PerSampleLoss | None = None,
        per_layer: bool = False,
        mode: Mode = "recompute",
        loss_reduction: Reduction = "mean",
        target: Target = None,
        mask_key: str | None = None,
        media_every_n_steps: int | None = None,
        forward_fn: ForwardFn | None = None,
        check_reduction: bool = True,
    ) -> None:
        super().__init__(every_n_steps, media_every_n_steps)
        owner = type(self).__name__
        check_choice(mode, "mode", MODES, owner)
        check_choice(loss_reduction, "loss_reduction", REDUCTIONS, owner)
        self.pass_ = MonitorPass(owner, forward_fn, loss_fn, loss_reduction,
                                 check_bool(check_reduction, "check_reduction", owner))
        if mode == "fused" and not self.pass_.of_step:
            raise ValueError(
                f"{owner}(mode='fused'): `loss_fn` and `forward_fn` are not used with mode='fused' (the per-sample "
                f"losses are those of `training_step`); drop them, or use mode='recompute' to measure them."
            )
        self.forward_fn = forward_fn
        self.check_reduction = check_reduction
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
        self._batch_checked = False  # the first batch's input is resolved at once, not at the first measured step

    @override
    def unsupported_when_sharded(self) -> str | None:
        return None  # the per-sample forms need only activations and output gradients, never a whole weight

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.site.resolve(pl_module)
        if self.mode == "recompute" and stage == "fit":
            self.pass_.setup(pl_module)
        if self.mode == "recompute" and self.loss_fn is not None and self.forward_fn is None:
            check_forward(pl_module, f"{type(self).__name__}(loss_fn=...)",
                          "Define `forward(self, x)` returning the outputs `loss_fn` takes (the logits), pass "
                          "`forward_fn=lambda module, batch: ...`, or drop `loss_fn` to measure `training_step`.")
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
        if not self._batch_checked:
            self._check_input(batch)
            self._batch_checked = True
        if self._pending is not None and logger_step(trainer) != self._pending_step:
            self._flush(trainer)  # the due step never reached the optimizer: log what we have
        if self.mode == "fused":
            self._fused_start(trainer, pl_module, batch)
            return
        if not self._due(trainer):
            return
        try:
            per_sample, hist = self.measure(pl_module, batch, batch_idx)
        except SkipBatch:  # `training_step` returns None on this batch: Lightning skips it, nothing to measure
            return
        self._pending_step = logger_step(trainer)
        self._global_step_at_start = trainer.global_step
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
        owner = type(self).__name__
        mask = self.site.mask(batch) if self.site.module is not None else None
        if self.site.module is not None:  # ∇ w.r.t. the target's output: the batch's input is only counted
            inputs, n = None, batch_size(batch, self.input_key, mask, owner)
        else:
            inputs = resolve_input(batch, self.input_key, owner, computed=True)[0]
            n = int(inputs.shape[0])
        self._recording = FusedRecording(self._module, inputs, n, owner, self._linear_tap,
                                         target=self.site.module, mask=mask,
                                         batch_tensors=[t for t in tree_flatten(batch)[0] if isinstance(t, Tensor)])
        self._linear_tap = self._recording.tap

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._recording is None:
            return
        recording, self._recording = self._recording, None
        batch = recording.batch
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

    def measure(self, pl_module: torch.nn.Module, batch: Any, batch_idx: int = 0) -> tuple[dict, dict]:
        """Per-sample norms on this batch, reduced over all ranks: ``({key: value}, {key: per-sample})``.

        Must be called on every rank at once under DDP (the reduction is a collective).

        Raises:
            SkipBatch: ``training_step`` returned None on ``batch`` (measuring the step's own loss).
        """
        if not self.site.resolved:
            self.site.resolve(pl_module)
        with isolated(pl_module):
            norms = self._of_step(pl_module, batch, batch_idx) if self.pass_.of_step else \
                self._of_forward(pl_module, batch)
        layers = {k: v.sqrt() for k, v in norms.layer_squared_norms.items()} if self.per_layer else {}
        return self._reduce(norms.input_norms, norms.param_norms, layers)

    def _check_input(self, batch: Any) -> None:
        """On the first batch: find the input as the measurement will (a wrong or missing ``input_key`` fails at
        step 0, not at the first measured step, which may be the 50th)."""
        if self.site.module is not None:  # ∇ w.r.t. a target's output: the input is only counted
            return
        owner = type(self).__name__
        if self.mode == "fused":
            resolve_input(batch, self.input_key, owner, computed=True)
        elif self.pass_.of_step:
            self._floating(resolve_input(batch, self.input_key, owner)[0])
        elif self.forward_fn is None:
            x = resolve_input(batch, self.input_key, owner, computed=True)[0]
            check_implicit_forward(batch, x, owner)

    def _floating(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise TypeError(
                f"{type(self).__name__}: the input selected by `input_key={self.input_key!r}` has dtype {x.dtype} "
                f"(token ids? labels?), so ‖∇ₓℓᵢ‖ does not exist. Pass the floating-point input's `input_key`, or "
                f"`target=` the layer whose output to differentiate (the embedding layer of a token model)."
            )

    def _of_step(self, pl_module: torch.nn.Module, batch: Any, batch_idx: int) -> PerSampleGradNorms:
        """The norms of sample i's share of ``training_step``'s loss: the step re-run, the input (or a zero δ on the
        target's output, padded positions masked) made a leaf, every layer's output gradient recorded."""
        owner, target = type(self).__name__, self.site.module
        trainer = attached_trainer(pl_module)
        strategy = trainer.strategy if trainer is not None else None
        tensors = [t for _, t in tensor_entries(batch)]
        made: list[Tensor] = []  # the latest run's loss (and δ on a target's output)
        if target is None:
            x, path = resolve_input(batch, self.input_key, owner)
            self._floating(x)
            n = x.shape[0]
            leaf = x.detach().requires_grad_(True)
            run = replace_input(batch, path, leaf)

            def loss() -> Tensor:
                made[:] = [self.pass_.loss(pl_module, run, batch_idx)]
                return made[0]

            wrt: Any = leaf
        else:
            mask = self.site.mask(batch)
            n = batch_size(batch, self.input_key, mask, owner)

            def loss() -> Tensor:  # each run its own δ (a first run may be followed by one recording every module)
                with perturbed_output(target, mask=mask, owner=owner, names=self.site.names) as record:
                    value = self.pass_.loss(pl_module, batch, batch_idx)
                if record.calls == 0:
                    raise not_run_error(owner, target, self.site.sharing, "training_step")
                made[:] = [value, record.delta]
                return value

            def wrt() -> Tensor:
                return made[1]

        try:
            norms = per_sample_grad_norms_of_loss(pl_module, loss, n, wrt=wrt, reduction=self.loss_reduction,
                                                  batch_tensors=tensors)
        except UnbatchedLayer as err:
            raise ValueError(
                f"{owner} reads the per-sample norms off the scalar loss `training_step` returns, which needs every "
                f"layer to keep the samples apart along its batch dimension: {err} Pass `forward_fn=lambda module, "
                f"batch: <outputs>` and a per-sample `loss_fn=lambda outputs, batch: <(B,) losses>`, which measure "
                f"any model exactly (the Hugging Face recipes in docs/monitors.md)."
            ) from err
        self.pass_.check_once(pl_module, batch, batch_idx, n, made[0], strategy)
        return norms

    def _of_forward(self, pl_module: torch.nn.Module, batch: Any) -> PerSampleGradNorms:
        """The norms of ``loss_fn(forward_fn(module, batch), batch)`` (or of ``module(input)``, checked)."""
        owner, target = type(self).__name__, self.site.module
        loss_fn = self.loss_fn or default_loss
        if self.forward_fn is None:
            x, path = resolve_input(batch, self.input_key, owner, computed=True)
            check_implicit_forward(batch, x, owner)
            forward = pl_module
        else:
            try:
                x, path = resolve_input(batch, self.input_key, owner)
            except ValueError:
                if target is None:
                    raise
                x, path = next(t for _, t in tensor_entries(batch) if t.ndim > 0), None  # the samples' count only

            def forward(x_: Tensor) -> Any:
                return self.forward_fn(pl_module, replace_input(batch, path, x_) if path is not None else batch)
        n = x.shape[0]
        if target is None:
            self._floating(x)

        def per_sample_loss(outputs: Any) -> Tensor:
            return check_per_sample(loss_fn(outputs, batch), n, "loss_fn(outputs, batch)")

        norms = per_sample_grad_norms_by_layer(pl_module, x, per_sample_loss, forward=forward,
                                               input_norms=target is None)
        if target is None:
            return norms
        # ‖∇ℓᵢ‖ w.r.t. the target's output (padded positions masked): one more forward/backward
        mask = self.site.mask(batch)
        with torch.enable_grad(), perturbed_output(target, mask=mask, owner=owner, names=self.site.names) as record:
            total = per_sample_loss(forward(x)).sum()
        if record.calls == 0:
            raise not_run_error(owner, target, self.site.sharing, "forward_fn" if self.forward_fn else "forward")
        (grad,) = torch.autograd.grad(total, record.delta, allow_unused=True)
        grad = torch.zeros_like(record.delta) if grad is None else grad
        return PerSampleGradNorms(per_sample_norm(grad), norms.param_norms, norms.layer_squared_norms, norms.values)

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
