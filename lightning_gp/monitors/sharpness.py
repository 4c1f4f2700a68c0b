"""SharpnessMonitor: the top eigenvalue of the training loss's Hessian (and its trace) against 2/η."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_gp._lightning.arguments import with_resolved
from lightning_gp._lightning.log_writer import define_summaries
from lightning_gp._lightning.logging import logger_step
from lightning_gp._lightning.trainer import attached_trainer
from lightning_gp.functional._autograd import METHODS, Method, agreed_method, no_double_backward_error
from lightning_gp.functional._checks import check_bool, check_choice, check_number, check_positive_int
from lightning_gp.functional._rng import mixed_seed, seeded_generator
from lightning_gp.functional.sharpness import (
    HVP,
    central_difference_hvp,
    double_backward_hvp,
    hutchinson_trace,
    power_iteration,
)
from lightning_gp.monitors._base import Monitor
from lightning_gp.monitors._pass import SkipBatch, step_loss
from lightning_gp.step._chain import averaged_over_ranks
from lightning_gp.step._seed import RunSeed

#: How the monitor takes Hessian-vector products (the package's one method type).
HVPMethod = Method
HVP_METHODS = METHODS
PREFIX = "sharpness"
log = logging.getLogger("lightning_gp")


class SharpnessMonitor(Monitor):
    """Logs ``sharpness/lambda_max``, the top eigenvalue of the Hessian of the training loss, and ``2/lr``.

    Measured on the step's batch with respect to all trainable parameters, at the parameters of that step, before
    the update: power iteration on Hessian-vector products of the loss ``training_step`` returns (the module's own
    step, without the package's penalty callbacks). Gradient descent at learning rate η drives λ_max to about 2/η
    (the edge of stability, Cohen et al. 2021; (2 + 2β)/η with heavy-ball momentum β), logged beside it as
    ``sharpness/two_over_lr`` (the first optimizer's first group). Under DDP it is the Hessian of the global loss:
    the ranks' products are averaged. It leaves training alone: parameters (moved in place for finite differences,
    put back bit for bit), optimizer state, the RNG the step sees, BatchNorm statistics and the module's other state.

    Args:
        every_n_steps: measure on every k-th optimizer step.
        trace: also log ``sharpness/trace``, Hutchinson's estimate of tr H over ``trace_samples`` vectors.
        iterations: at most this many Hessian-vector products for λ_max.
        tol: stop the power iteration when λ moves by at most this, relative.
        trace_samples: Rademacher vectors of the trace estimate.
        method: ``"double_backward"``, ``"finite_difference"`` (central differences of gradients at θ ± h·v, for
            SDPA attention and compiled modules), or ``"auto"`` (the first where the model has a double backward).
        step: the finite difference's relative step, θ moves by ``step``·‖θ‖ (None: 1e-3, or √ε of a less precise
            dtype the model computes in, ``precision.default_step``).

    Raises:
        ValueError, TypeError: an invalid argument (named).

    Example:


        >>> monitor = SharpnessMonitor(every_n_steps=100, trace=True)  # then: Trainer(callbacks=[monitor])
        >>> monitor
        SharpnessMonitor(every_n_steps=100, trace=True)
    """

    def __init__(self, every_n_steps: int = 50, *, trace: bool = False, iterations: int = 20, tol: float = 1e-3,
                 trace_samples: int = 10, method: HVPMethod = "auto", step: float | None = None) -> None:
        super().__init__(check_positive_int(every_n_steps, "every_n_steps", type(self).__name__))
        owner = type(self).__name__
        self.trace = check_bool(trace, "trace", owner)
        self.iterations = check_positive_int(iterations, "iterations", owner)
        self.tol = check_number(tol, "tol", owner)
        self.trace_samples = check_positive_int(trace_samples, "trace_samples", owner)
        self.method = check_choice(method, "method", HVP_METHODS, owner)
        self.step = None if step is None else check_number(step, "step", owner, strict=True)
        self._resolved: str | None = None if method == "auto" else method
        self.seed = RunSeed()  # the base of the dropout masks and the power iteration's start: checkpointed

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.seed.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.seed.load_state_dict(state_dict)

    @override
    def unsupported_when_sharded(self) -> str | None:
        return "its Hessian-vector products are not written for sharded parameters yet"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self.seed.setup(trainer.strategy)
        if stage == "fit" and not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} takes the Hessian of the loss `training_step` returns, re-running it on the "
                f"step's batch; `{type(pl_module).__name__}` uses manual optimization, whose `training_step` steps the "
                f"optimizers itself (the measurement would train the model). Measure a module with automatic "
                f"optimization, or call `lightning_gp.functional.hessian_max_eigenvalue` on your own loss."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        define_summaries(trainer, {f"{PREFIX}/lambda_max": "max"})

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._due(trainer):
            return
        step = logger_step(trainer)
        try:
            values = self.measure(pl_module, batch, batch_idx, trainer.strategy, step=step)
        except SkipBatch:  # `training_step` returned None: Lightning skips the batch, nothing to measure
            return
        self._log(trainer, values, step)

    def measure(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int = 0, strategy: Any = None, *,
                step: int = 0) -> dict[str, Tensor]:
        """``{"sharpness/lambda_max": λ, ...}`` of the loss of ``pl_module``'s own ``training_step`` on ``batch``
        (``step`` seeds the draws; ``strategy`` averages the products over DDP ranks)."""
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self).__name__}: `{type(pl_module).__name__}` has no trainable parameter.")
        device = params[0].device
        self.seed.setup(strategy)  # chosen at `setup` in a Trainer (kept); here for a direct call
        # the same start vector on every rank (the averaged products are H·v of the global loss); each rank's masks
        seed = self.seed.mixed(step)
        rank = 0 if strategy is None else strategy.global_rank
        loss_at = self._loss(pl_module, batch, batch_idx, seed=mixed_seed(seed, rank))
        local = self._hvp(loss_at, params, strategy)

        def hvp(v: list[Tensor]) -> list[Tensor]:
            return averaged_over_ranks(strategy, local(v))

        generator = seeded_generator(device, seed)
        value, _ = power_iteration(hvp, params, iterations=self.iterations, tol=self.tol, generator=generator)
        out = {f"{PREFIX}/lambda_max": value.float()}
        lr = _learning_rate(pl_module)
        if lr is not None and lr > 0:
            out[f"{PREFIX}/two_over_lr"] = torch.tensor(2.0 / lr)
        if self.trace:
            out[f"{PREFIX}/trace"] = hutchinson_trace(hvp, params, samples=self.trace_samples,
                                                      generator=generator).float()
        return out

    def _loss(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, seed: int) -> Callable[[], Tensor]:
        """The raw loss of ``training_step`` on ``batch``, computed in train mode with a fixed random stream (every
        pass sees the same dropout masks, and the step's own stream is untouched) and the module put back after."""
        name = type(self).__name__

        def loss_at() -> Tensor:
            with torch.enable_grad():
                return step_loss(pl_module, batch, batch_idx, name, rng=seed)

        return loss_at

    def _hvp(self, loss_at: Callable[[], Tensor], params: list[Tensor], strategy: Any) -> HVP:
        """This rank's Hessian-vector products, by the method resolved at the first measurement."""
        if self._resolved == "double_backward":
            return double_backward_hvp(loss_at(), params)
        if self._resolved is None:
            works = True
            try:  # "auto", first measurement: the gradient with its graph, and one product (thrown away)
                hvp = double_backward_hvp(loss_at(), params)
                hvp([torch.zeros_like(p) for p in params])
            except RuntimeError as err:  # a compiled backward may refuse already the graph of the gradient
                if no_double_backward_error(err) is None:
                    raise
                works = False
            world = strategy is not None and strategy.world_size > 1  # every rank differences if one cannot
            self._resolved = agreed_method(works, (lambda t: strategy.reduce(t, reduce_op="max")) if world else None,
                                           params[0].device)[0]
            log.info("%s(method='auto') uses %r", type(self).__name__, self._resolved)
            if self._resolved == "double_backward":
                return hvp
        return central_difference_hvp(loss_at, params, step=self.step)

    @override
    def __repr__(self) -> str:
        return with_resolved(super().__repr__(), self.method, self._resolved)


def _learning_rate(pl_module: pl.LightningModule) -> float | None:
    """The first optimizer's first learning rate, or None."""
    trainer = attached_trainer(pl_module)
    optimizers = trainer.optimizers if trainer is not None else []
    if not optimizers:
        return None
    lr = optimizers[0].param_groups[0].get("lr")
    return float(lr) if isinstance(lr, (int, float, Tensor)) and math.isfinite(float(lr)) else None

