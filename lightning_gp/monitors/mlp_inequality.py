"""MLPInequalityMonitor: both sides of the MLP inequality over training, and their ratio."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_gp._lightning.log_writer import define_summaries, gathered_rows, has_wandb, log_inequality
from lightning_gp._lightning.logging import logger_step
from lightning_gp._lightning.trainer import attached_trainer
from lightning_gp.functional._checks import check_bool, check_choice, check_per_sample, check_positive_int
from lightning_gp.functional.mlp_inequality import MLPInequality, chain_layers, mlp_inequality
from lightning_gp.monitors._base import Monitor, isolated
from lightning_gp.monitors._batch import default_loss
from lightning_gp.monitors._pass import (
    ForwardFn,
    MonitorPass,
    PerSampleLoss,
    SkipBatch,
    batch_size,
    check_implicit_forward,
)
from lightning_gp.step._batch import InputKey, resolve_input, slice_batch
from lightning_gp.step._objective import REDUCTIONS, Reduction

PREFIX = "mlp_inequality"


class MLPInequalityMonitor(Monitor):
    r"""Logs the MLP inequality ‖∇ₓf‖²·Σₜ(1 + ‖h⁽ᵗ⁾‖²)/(‖W⁽ᵗ⁾‖₂²‖∇ₓh⁽ᵗ⁾‖₂²) ≤ ‖∇θf‖² per sample.

    For a chain of Linear layers and elementwise activations (an ``nn.Sequential`` of the module; Dherin et al.
    2021) lhs/rhs lies in [0, 1]; x and f are the chain's input and sample i's loss as ``training_step`` runs them.
    Logged over each rank's first ``max_samples`` samples, reduced across ranks (``mlp_inequality/ratio_mean``,
    ``ratio_max``, ``lhs_mean``, ``rhs_mean``, per-layer terms), in eval mode. Keys, rules: [Monitors](../monitors.md).

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        max_samples: samples per rank and measurement (the Jacobian norms cost ~1 forward per feature and sample).
        input_key: the input in the batch: an index, a dict key, or a callable batch → input tensor.
        loss_fn: ``(outputs, batch) -> (B,)`` of ``forward_fn``'s outputs (default cross-entropy), or alone of the
            chain's output on the input. Neither: the step's own loss.
        forward_fn: ``(module, batch) -> outputs``, the model as ``training_step`` calls it (the chain once).
        loss_reduction: ``"mean"`` or ``"sum"``, how ``training_step`` reduces the per-sample losses.
        check_reduction: check ``loss_reduction`` on the two half-batches of the first measurement.
        submodule: dotted name of the chain in the LightningModule; default its only ``nn.Sequential`` child.
        tables: also log the W&B media (a table, a scatter, a histogram of the ratio, an image).
        media_every_n_steps: the media at most every this many steps (default: 10 × ``every_n_steps``).

    Raises:
        ValueError: at setup, no single chain or a layer that is not allowed; a chain that does not run once.

    Example:


        >>> class Net(pl.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        ...     def training_step(self, batch, batch_idx):  # the monitor re-runs it
        ...         return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])
        >>> values, _ = MLPInequalityMonitor().measure(Net(), (torch.randn(16, 3), torch.randint(0, 2, (16,))))
        >>> 0 <= float(values["mlp_inequality/ratio_mean"]) <= float(values["mlp_inequality/ratio_max"]) <= 1
        True
    """

    def __init__(
        self,
        *,
        every_n_steps: int | None = None,
        max_samples: int = 64,
        input_key: InputKey = None,
        loss_fn: PerSampleLoss | None = None,
        submodule: str | None = None,
        tables: bool = True,
        media_every_n_steps: int | None = None,
        forward_fn: ForwardFn | None = None,
        loss_reduction: Reduction = "mean",
        check_reduction: bool = True,
    ) -> None:
        super().__init__(every_n_steps, media_every_n_steps)
        owner = type(self).__name__
        self.max_samples = check_positive_int(max_samples, "max_samples", owner)
        self.loss_reduction = check_choice(loss_reduction, "loss_reduction", REDUCTIONS, owner)
        self.check_reduction = check_bool(check_reduction, "check_reduction", owner)
        self.pass_ = MonitorPass(owner, forward_fn, loss_fn, loss_reduction, self.check_reduction)
        self.forward_fn = forward_fn
        if submodule is not None and not isinstance(submodule, str):
            raise TypeError(f"`submodule` must be a dotted module name (str), got {type(submodule).__name__}.")
        self.input_key = input_key
        self.loss_fn = loss_fn  # None: default_loss (kept as given, for the repr)
        self.submodule = submodule
        self.tables = bool(tables)

    @override
    def unsupported_when_sharded(self) -> str | None:
        return "its right-hand side takes the spectral norm ‖W‖₂ of whole weight matrices"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self.pass_.setup(pl_module)
            chain = self._chain(pl_module)[1]  # its own errors name the fix
            try:
                chain_layers(chain)  # not a chain: fail now, not after an epoch
            except ValueError as err:
                # The functional layer's hint (`allow_non_chain=True`) is not an argument of the monitor.
                message = " ".join(s for s in re.split(r"(?<=[.)])\s+", str(err)) if "allow_non_chain" not in s)
                raise ValueError(
                    f"MLPInequalityMonitor: {message} The inequality is only defined for such a chain: pass "
                    f"`submodule=\"<name>\"` naming an nn.Sequential of Linear layers and elementwise activations, "
                    f"or remove the monitor."
                ) from None

    def _chain(self, pl_module: nn.Module) -> tuple[str, nn.Module]:
        if self.submodule is not None:
            try:
                return self.submodule, pl_module.get_submodule(self.submodule)
            except AttributeError as err:
                raise ValueError(
                    f"`MLPInequalityMonitor(submodule={self.submodule!r})`: {type(pl_module).__name__} has no "
                    f"such submodule ({err})."
                ) from None
        found = [(n, m) for n, m in pl_module.named_children() if isinstance(m, nn.Sequential)]
        if len(found) != 1:
            raise ValueError(
                f"MLPInequalityMonitor needs the nn.Sequential chain to evaluate; {type(pl_module).__name__} has "
                f"{len(found)} nn.Sequential children {[n for n, _ in found]}. Pass `submodule=\"<name>\"`."
            )
        return found[0]

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        define_summaries(trainer, {f"{PREFIX}/ratio_max": "max", f"{PREFIX}/ratio_mean": "max"})

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        step = logger_step(trainer)
        try:
            values, result = self.measure(pl_module, batch, batch_idx)
        except SkipBatch:  # `training_step` returns None on this batch: Lightning skips it
            return
        self._log(trainer, values, step)
        if self.tables and has_wandb(trainer) and self._media_due(step):  # the same decision on every rank
            rows = gathered_rows(trainer, torch.stack([result.lhs, result.rhs, result.ratio], dim=1))
            log_inequality(trainer, PREFIX, rows[:, 0], rows[:, 1], rows[:, 2], step)

    def measure(self, module: nn.Module, batch: Any, batch_idx: int = 0) -> tuple[dict, MLPInequality]:
        """The reduced values on this rank's first ``max_samples`` samples, and this rank's raw result.

        Must be called on every rank at once under DDP (the reduction is a collective).

        Raises:
            SkipBatch: ``training_step`` returned None on ``batch`` (measuring the step's own loss).
        """
        owner = type(self).__name__
        name, chain = self._chain(module)
        prefix = f"{name}."
        size = batch_size(batch, self.input_key, None, owner)
        if self.max_samples < size:
            batch = slice_batch(batch, size, slice(0, self.max_samples))
        n = min(size, self.max_samples)
        with isolated(module):
            if self.pass_.of_step or self.forward_fn is not None:
                x, gz = self._at_chain(module, chain, name, batch, batch_idx, n)
                r = mlp_inequality(chain, x, lambda out: (out * gz).flatten(1).sum(1))
            else:  # `loss_fn` alone: the chain on the batch's input
                inputs = resolve_input(batch, self.input_key, owner, computed=True)[0]
                check_implicit_forward(batch, inputs, owner)

                def per_sample_loss(outputs: Tensor) -> Tensor:
                    return check_per_sample(self.loss_fn(outputs, batch), n, "loss_fn(outputs, batch)")

                r = mlp_inequality(chain, inputs, per_sample_loss)
        columns = torch.cat([torch.stack([r.ratio, r.lhs, r.rhs], 1), r.lhs_terms, r.rhs_terms], 1).detach()
        mean, maximum = self._reduce_per_sample(columns)
        out = {
            f"{PREFIX}/ratio_mean": mean[0],
            f"{PREFIX}/ratio_max": maximum[0],
            f"{PREFIX}/lhs_mean": mean[1],
            f"{PREFIX}/rhs_mean": mean[2],
        }
        layers = len(r.layer_names)
        for t, layer in enumerate(r.layer_names):
            out[f"{PREFIX}/lhs_term/{prefix}{layer}"] = mean[3 + t]
            out[f"{PREFIX}/rhs_term/{prefix}{layer}"] = mean[3 + layers + t]
        return out, r

    def _at_chain(self, module: nn.Module, chain: nn.Module, name: str, batch: Any, batch_idx: int,
                  n: int) -> tuple[Tensor, Tensor]:
        """The chain's input x as the pass feeds it, and ∇fᵢ at the chain's output z (per sample).

        Both sides of the inequality depend on f only through ∇ₓf = Jᵀ∇_z f and ∇θf = (∂z/∂θ)ᵀ∇_z f, so the
        linear fᵢ(z) = ⟨∇_z fᵢ, zᵢ⟩ (∇ fixed) gives exactly the values of the step's own per-sample loss.
        """
        owner = type(self).__name__
        calls: list[tuple[Tensor, Tensor]] = []

        def hook(mod: nn.Module, args: tuple, output: Any) -> None:
            calls.append((args[0] if args else None, output))

        handle = chain.register_forward_hook(hook)
        try:
            if self.pass_.of_step:
                loss = self.pass_.loss(module, batch, batch_idx)
                total, factor = loss, (float(n) if self.loss_reduction == "mean" else 1.0)
            else:
                outputs = self.forward_fn(module, batch)
                total = check_per_sample((self.loss_fn or default_loss)(outputs, batch), n,
                                         "loss_fn(outputs, batch)").sum()
                factor = 1.0
        finally:
            handle.remove()
        where = "`training_step`" if self.pass_.of_step else "`forward_fn`"
        if len(calls) != 1 or not isinstance(calls[0][0], Tensor) or not isinstance(calls[0][1], Tensor):
            raise ValueError(
                f"{owner}: the chain `{name}` ran {len(calls)} times in {where} on one batch"
                + ("" if len(calls) != 1 else " without a tensor input and output")
                + "; the inequality is one pass of the input through the chain. Pass `submodule=` a chain the step "
                "runs once, or `forward_fn` and `loss_fn` for the function to measure."
            )
        x, z = calls[0]
        if x.shape[0] != n or z.shape[0] != n:
            raise ValueError(f"{owner}: the chain `{name}` ran on a batch of {x.shape[0]} rows in {where}, not on the "
                             f"{n} samples of the batch (flattened or batch-second data?).")
        (gz,) = torch.autograd.grad(total, z, allow_unused=True)
        gz = torch.zeros_like(z) if gz is None else gz * factor
        if self.pass_.of_step:
            trainer = attached_trainer(module)
            self.pass_.check_once(module, batch, batch_idx, n, loss, trainer.strategy if trainer else None)
        return x.detach(), gz.detach()
