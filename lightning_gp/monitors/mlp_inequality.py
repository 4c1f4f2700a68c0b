"""MLPInequalityMonitor: both sides of the MLP inequality over training, and their ratio."""

from __future__ import annotations

import re
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_gp._arguments import check_positive_int
from lightning_gp._batch import InputKey, resolve_input, slice_batch
from lightning_gp._log_writer import define_summaries, gathered_rows, has_wandb, log_inequality
from lightning_gp._logging import logger_step
from lightning_gp.functional._checks import check_per_sample
from lightning_gp.functional.mlp_inequality import MLPInequality, chain_layers, mlp_inequality
from lightning_gp.monitors._base import Monitor, isolated
from lightning_gp.monitors._batch import default_loss
from lightning_gp.monitors.gradient_norm import PerSampleLoss

PREFIX = "mlp_inequality"


class MLPInequalityMonitor(Monitor):
    r"""Logs the MLP inequality ‖∇ₓf‖²·Σₜ(1 + ‖h⁽ᵗ⁾‖²)/(‖W⁽ᵗ⁾‖₂²‖∇ₓh⁽ᵗ⁾‖₂²) ≤ ‖∇θf‖² per sample.

    f is the per-sample loss; the ratio lhs/rhs lies in [0, 1] for a chain of Linear layers and elementwise
    activations (Dherin et al., "The Geometric Occam's Razor Implicit in Deep Learning"). Logged over the
    first ``max_samples`` samples of each rank, reduced across ranks: ``mlp_inequality/ratio_mean``,
    ``ratio_max``, ``lhs_mean``, ``rhs_mean``, per-layer ``lhs_term/<layer>`` and ``rhs_term/<layer>``; on W&B
    a per-sample table, a scatter of lhs against rhs and its image. It evaluates an ``nn.Sequential`` of the
    module, in eval mode, and leaves training unchanged. Keys and rules: ``docs/monitors.md``.

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        max_samples: samples per rank and measurement (the Jacobian norms cost about one forward pass per
            input feature and sample).
        input_key: the input in the batch: an index, a dict key, or a callable batch → input tensor.
        loss_fn: ``(outputs, batch) -> per-sample losses (B,)``; default per-sample cross-entropy.
        submodule: dotted name of the chain in the LightningModule; default its only ``nn.Sequential`` child.
        tables: also log the W&B media: a table, a scatter chart, a histogram of the ratio and an image, over all
            ranks' samples.
        media_every_n_steps: the media at most every this many steps (default: 10 × ``every_n_steps``).

    Raises:
        ValueError: at setup, no single chain to evaluate, or a chain with a layer that is not allowed.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> monitor = MLPInequalityMonitor(every_n_steps=100)  # then: Trainer(callbacks=[monitor])
        >>> x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> values, _ = monitor.measure(net, x, (x, y), prefix="")
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
    ) -> None:
        super().__init__(every_n_steps, media_every_n_steps)
        self.max_samples = check_positive_int(max_samples, "max_samples", type(self).__name__)
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable (outputs, batch) -> (B,), got {type(loss_fn).__name__}.")
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
        name, chain = self._chain(pl_module)
        inputs = resolve_input(batch, self.input_key, type(self).__name__, computed=True)[0]
        values, result = self.measure(chain, inputs, batch, prefix=f"{name}.")
        self._log(trainer, values, step)
        if self.tables and has_wandb(trainer) and self._media_due(step):  # the same decision on every rank
            rows = gathered_rows(trainer, torch.stack([result.lhs, result.rhs, result.ratio], dim=1))
            log_inequality(trainer, PREFIX, rows[:, 0], rows[:, 1], rows[:, 2], step)

    def measure(self, chain: nn.Module, inputs: Tensor, batch: Any, *, prefix: str) -> tuple[dict, MLPInequality]:
        """The reduced values on this rank's first ``max_samples`` samples, and this rank's raw result.

        Must be called on every rank at once under DDP (the reduction is a collective).
        """
        size = inputs.shape[0]
        if self.max_samples < size:
            batch = slice_batch(batch, size, slice(0, self.max_samples))
        inputs = inputs[: self.max_samples]

        def per_sample_loss(outputs: Tensor) -> Tensor:
            return check_per_sample((self.loss_fn or default_loss)(outputs, batch), inputs.shape[0],
                                    "loss_fn(outputs, batch)")

        with isolated(chain):
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
