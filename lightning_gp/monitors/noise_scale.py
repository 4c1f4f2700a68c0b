"""GradientNoiseScale: the critical batch size B_simple = tr Σ / |G|², from the per-sample gradient norms."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from lightning_gp._lightning.trainer import loss_scale
from lightning_gp.functional._checks import check_number
from lightning_gp.functional.noise_scale import noise_scale, two_batch_noise_scale
from lightning_gp.monitors._base import isolated
from lightning_gp.monitors._pass import ForwardFn, PerSampleLoss, SkipBatch, batch_size
from lightning_gp.monitors.gradient_norm import PREFIX as NORM_PREFIX
from lightning_gp.monitors.gradient_norm import GradientNormMonitor, Mode
from lightning_gp.step._batch import InputKey
from lightning_gp.step._objective import Reduction

PREFIX = "noise_scale"
#: The logged ingredients, raw and smoothed.
KEYS = ("b_simple", "trace_sigma", "grad_sq")


class GradientNoiseScale(GradientNormMonitor):
    r"""Logs the gradient noise scale B_simple = tr Σ / |G|² (McCandlish et al. 2018), the critical batch size.

    From the exact per-sample gradient norms of the step's own backward (``mode="fused"``, no extra pass) and the
    step's gradient (after DDP averaging and AMP unscaling): S = mean ‖∇θℓᵢ‖² and ‖ḡ‖² over the N samples of the
    optimizer step, all ranks and micro-batches together, give the unbiased tr Σ = (S − ‖ḡ‖²)·N/(N − 1) and
    |G|² = (N‖ḡ‖² − S)/(N − 1). Logged every ``every_n_steps`` steps: ``noise_scale/b_simple``, ``trace_sigma``,
    ``grad_sq`` and their ``*_ema`` (tr Σ and |G|² smoothed apart, bias-corrected, then divided, as the paper
    advises: one batch's |G|² can be negative). Under DDP also the paper's two-batch estimate from a rank's gradient
    (read by a communication hook before the all-reduce) and the mean one: ``noise_scale/two_batch/*``. Training is
    unchanged bit for bit. Notes: [Monitors](../monitors.md).

    Args:
        every_n_steps: measure on every k-th optimizer step.
        ema: the smoothing factor of the ``*_ema`` keys, in [0, 1); None logs the raw values only.
        mode: ``"fused"`` (the step's own backward) or ``"recompute"`` (an eval-mode pass of the first micro-batch,
            for models whose layers mix samples, with ``forward_fn`` and a per-sample ``loss_fn``).
        loss_reduction: ``"mean"`` or ``"sum"``, how ``training_step`` reduces the per-sample losses (checked on the
            first batch, as the penalties check it; ``check_reduction=False`` skips that).
        input_key: the input in the batch (its first dimension counts the samples).
        forward_fn: ``mode="recompute"``: ``(module, batch) -> outputs``, the model as ``training_step`` calls it.
        loss_fn: ``mode="recompute"``: ``(outputs, batch) -> (B,)`` per-sample losses of ``forward_fn``'s outputs.

    Raises:
        ValueError: a bad argument (named); RuntimeError: in ``setup``, a callback that adds to the loss (the
            gradient would not be the loss's), manual optimization.

    Example:


        >>> monitor = GradientNoiseScale(every_n_steps=20, ema=0.9)  # then: Trainer(callbacks=[monitor])
        >>> monitor
        GradientNoiseScale(every_n_steps=20, ema=0.9)
    """

    def __init__(self, every_n_steps: int = 50, *, ema: float | None = 0.95, mode: Mode = "fused",
                 loss_reduction: Reduction = "mean", input_key: InputKey = None, forward_fn: ForwardFn | None = None,
                 loss_fn: PerSampleLoss | None = None, check_reduction: bool = True) -> None:
        super().__init__(every_n_steps=every_n_steps, input_key=input_key, histograms=False, per_layer=False,
                         mode=mode, loss_reduction=loss_reduction, forward_fn=forward_fn, loss_fn=loss_fn,
                         check_reduction=check_reduction)
        if ema is not None:
            check_number(ema, "ema", type(self).__name__)
            if not 0 <= ema < 1:
                raise ValueError(f"{type(self).__name__}(ema={ema!r}): `ema` must lie in [0, 1) (0.95 averages "
                                 f"about the last 20 measurements), or be None for the raw values only.")
        self.ema = ema
        #: {"trace_sigma" | "grad_sq": [weighted sum, total weight]} of the bias-corrected moving averages
        self._averages: dict[str, list[float]] = {}
        # DDP: this rank's gradient before the all-reduce (squared norms of its buckets, on measured steps), and the
        # loss scale of that backward; None where no hook could be registered
        self._local: list[Tensor] | None = None
        self._scale = 1.0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        penalties = [type(cb).__name__ for cb in trainer.callbacks if getattr(cb, "adds_to_loss", False)]
        if stage == "fit" and penalties:
            raise RuntimeError(
                f"{type(self).__name__} reads |G|² off the step's gradient, but {', '.join(penalties)} add(s) terms "
                f"to the loss, so that gradient is not the mean of the per-sample gradients. Measure the noise "
                f"scale in a run without them."
            )
        if stage == "fit" and not pl_module.automatic_optimization:
            raise RuntimeError(f"{type(self).__name__} reads the gradient of Lightning's automatic-optimization "
                               f"step; `{type(pl_module).__name__}` uses manual optimization.")
        super().setup(trainer, pl_module, stage)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no W&B summaries of the gradient-norm keys, which this monitor does not log; under DDP, the rank's own
        # gradient for the paper's two-batch estimate: a communication hook sees each bucket before its all-reduce
        self._local = None
        model = trainer.strategy.model
        if trainer.world_size > 1 and isinstance(model, DistributedDataParallel):
            try:
                model.register_comm_hook(self, _local_norm_then_allreduce)
                self._local = []
            except RuntimeError as err:  # a hook of the user's own (DDPStrategy(ddp_comm_hook=...)): keep it
                rank_zero_warn(f"{type(self).__name__}: no two-batch estimate (`noise_scale/two_batch/*`), the DDP "
                               f"model has a communication hook already ({err}).")

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_after_backward(trainer, pl_module)
        self._scale = loss_scale(trainer)  # the GradScaler's scale of this backward (it may change at the step)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.check_reduction and not self.pass_.checked:
            # |G|² is read off the step's gradient, whatever measures the per-sample norms: check its reduction on
            # the first batch (the two half-batches against the whole, without grad, in the monitors' isolation)
            try:
                n = batch_size(batch, self.input_key, None, type(self).__name__)
                with isolated(pl_module), torch.no_grad():
                    loss = self.pass_.loss(pl_module, batch, batch_idx)
                self.pass_.check_once(pl_module, batch, batch_idx, n, loss, trainer.strategy)
            except SkipBatch:
                pass  # the step skips this batch: check the next one
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def _reduce_columns(self, columns: Tensor, layer_names: list[str], extra: list[Tensor] = (),
                        factor: float = 1.0) -> tuple[dict[str, float], list[float]]:
        """This rank's Σ‖∇θℓᵢ‖² and sample count (summed over ranks in :meth:`_log`); ``extra`` passed through."""
        sq = (columns[:, 1].to(_sum_dtype(columns.device)) * factor).square()
        flat = torch.cat([torch.stack([sq.sum(), sq.new_tensor(float(sq.shape[0]))]),
                          *[e.to(sq.dtype) for e in extra]]).tolist()
        return {"_sum_sq": flat[0], "_count": flat[1]}, flat[2:]

    @override
    def _log(self, trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
        local = self._local_sq()
        sums = [metrics.pop("_sum_sq", math.nan), metrics.pop("_count", 0.0), local]
        batch_sq = sum(v * v for k, v in metrics.items() if k.startswith(f"{NORM_PREFIX}/param_batch"))
        if trainer.world_size > 1:  # every rank's samples: one all-reduce of three numbers at the logging cadence
            device = trainer.strategy.root_device
            sums = trainer.strategy.reduce(torch.tensor(sums, dtype=_sum_dtype(device), device=device),
                                           reduce_op="sum").tolist()
        sum_sq, count, local = sums
        # ḡ is the mean over every sample behind the optimizer step; recompute measures the first micro-batch only
        n = round(count) * (trainer.accumulate_grad_batches if self.mode == "recompute" else 1)
        if self.loss_reduction == "sum":  # the step's gradient is (samples per rank and micro-batch) × ḡ
            per_micro_batch = n / (trainer.world_size * trainer.accumulate_grad_batches)
            batch_sq, local = batch_sq / per_micro_batch**2, local / per_micro_batch**2
        if count < 1 or n < 2:
            return
        est = noise_scale(sum_sq / count, batch_sq, n)
        values = {f"{PREFIX}/{k}": float(v) for k, v in zip(KEYS, (est.b_simple, est.trace_sigma, est.grad_sq),
                                                             strict=True)}
        if math.isfinite(local) and trainer.world_size > 1:  # the paper's estimate: a rank's gradient and the mean
            two = two_batch_noise_scale(local / trainer.world_size, batch_sq, n // trainer.world_size, n)
            values.update({f"{PREFIX}/two_batch/{k}": float(v) for k, v in zip(
                KEYS, (two.b_simple, two.trace_sigma, two.grad_sq), strict=True)})
        if self.ema is not None:
            for key, value in (("trace_sigma", float(est.trace_sigma)), ("grad_sq", float(est.grad_sq))):
                total, weight = self._averages.get(key, [0.0, 0.0])
                self._averages[key] = [self.ema * total + (1 - self.ema) * value, self.ema * weight + (1 - self.ema)]
            trace, grad = (t / w for t, w in (self._averages["trace_sigma"], self._averages["grad_sq"]))
            values.update({f"{PREFIX}/trace_sigma_ema": trace, f"{PREFIX}/grad_sq_ema": grad,
                           f"{PREFIX}/b_simple_ema": trace / grad if grad != 0 else math.inf})
        super()._log(trainer, values, step)

    def _local_sq(self) -> float:
        """‖this rank's gradient‖² of the measured step (its buckets' squares summed, unscaled); NaN without it."""
        if not self._local:
            return math.nan
        total = float(torch.stack(self._local).sum())
        self._local.clear()
        return total / self._scale**2

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"averages": {k: list(v) for k, v in self._averages.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._averages = {k: list(v) for k, v in state_dict.get("averages", {}).items()}


def _local_norm_then_allreduce(monitor, bucket):
    """DDP's own all-reduce (``allreduce_hook``: the bucket divided by the world size, then summed over the ranks),
    after taking the squared norm of the rank's gradient in the bucket on a measured step (no host read here)."""
    if monitor._pending is not None and monitor._local is not None:
        buffer = bucket.buffer().detach()
        monitor._local.append(buffer.to(_sum_dtype(buffer.device)).square().sum())
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    return allreduce_hook(None, bucket)


def _sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype the estimate's sums of squares are taken in: float64 where the device has it cheaply (the CPU),
    float32 elsewhere (the two equations subtract near-equal terms)."""
    return torch.float64 if device.type == "cpu" else torch.float32
