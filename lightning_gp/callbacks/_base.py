"""The Callback base of the loss-changing callbacks: wiring, scheduling, checkpoint state and logging.

A callback registers with :class:`lightning_gp.step.interception.StepInterceptor`, the one wrapper of
``training_step``, whose runner is :func:`lightning_gp.step._chain.run_chain`; the objective's algebra is
:mod:`lightning_gp.step._objective`. Design notes: ``docs/design/interception.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_gp._lightning.arguments import init_repr
from lightning_gp._lightning.epoch import EpochAggregate
from lightning_gp._lightning.log_writer import log_settings
from lightning_gp._lightning.logging import over_ranks, should_log
from lightning_gp._lightning.private import callback_state_key, compiled_modules
from lightning_gp._lightning.setup_checks import check_batch_step, check_strategy, sharded_training
from lightning_gp._lightning.trainer import grad_scaler
from lightning_gp.functional._checks import check_bool, check_number, check_positive_int
from lightning_gp.functional._sharded import whole
from lightning_gp.step._chain import DEFAULT_ORDER, StepContext, run_chain
from lightning_gp.step._finite import StepValues, check_step, param_names
from lightning_gp.step._objective import Objective, caller_name
from lightning_gp.step._seed import RunSeed
from lightning_gp.step.interception import StepInterceptor


def _run_intercepted(interceptor: StepInterceptor, step_fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The interceptor's runner for the penalty callbacks."""
    trainer = interceptor.trainer
    values = None
    if any(getattr(m, "check_finite", True) for m in interceptor.members):
        if interceptor.step_values is None:
            interceptor.step_values = StepValues()
        values = interceptor.step_values
    return run_chain(interceptor.module, step_fn, interceptor.members, args, kwargs, trainer.global_step,
                     trainer.strategy, values, lightning_backward=True)


class PenaltyCallback(Callback):
    """Base of the loss-changing callbacks: registers with the interceptor, schedules, checks and logs."""

    #: Marks a callback that adds a term to the loss ``training_step`` returns (monitors that read that loss's
    #: backward refuse to share a Trainer with one).
    adds_to_loss = True
    #: Nesting position in the shared wrapper (smaller = outer).
    order = DEFAULT_ORDER
    #: Whether :meth:`apply` differentiates the loss of the inner chain through its graph (after it returned).
    needs_loss_graph = False
    #: ``penalty/<log_name>`` in the logs.
    log_name = "penalty"

    def __init__(self, weight: float, every_n_steps: int = 1, check_finite: bool = True) -> None:
        owner = type(self).__name__
        self.weight = check_number(weight, "weight", owner)
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps", owner)
        self.check_finite = check_bool(check_finite, "check_finite", owner)
        self.applied = 0  # how many steps carried the term (the schedule itself follows trainer.global_step)
        self._epoch = EpochAggregate()  # the sample-weighted epoch mean of every logged value
        self._values_epoch: int | None = None  # the epoch `_epoch` holds (reset by `record` under `penalized_loss`)
        self._state_key: str | None = None  # computed once, at the first read of `state_key`
        self._draw: tuple[int, int] | None = None  # (global step, micro-batch) of the last `step_generator`
        self.seed = RunSeed()  # the base of every draw (attack starts, VAT directions): checkpointed

    def __repr__(self) -> str:
        return init_repr(self)

    @property
    @override
    def state_key(self) -> str:
        """Identifies the callback in checkpoints: its class and what it applies to (:meth:`state_key_fields`),
        never a hyperparameter a user may tune on resume. Computed once (Lightning reads it on every hook)."""
        if self._state_key is None:
            fields = self.state_key_fields()
            self._state_key = callback_state_key(self, **fields) if fields else type(self).__qualname__
        return self._state_key

    def state_key_fields(self) -> dict[str, Any]:
        """What tells two instances of the callback apart in a checkpoint (e.g. the input they perturb)."""
        return {}

    # -- wiring ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__, self.unsupported_when_sharded())
        self.seed.setup(trainer.strategy)
        check_batch_step(pl_module, type(self).__name__)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} works with automatic optimization. `{type(pl_module).__name__}` uses "
                f"manual optimization: remove the callback and call "
                f"`lightning_gp.manual.penalized_loss(self, loss_fn, batch, [{type(self).__name__}(...)])` "
                f"before `self.manual_backward`."
            )
        method = getattr(self, "method", None)
        if method == "auto" and sharded_training(trainer):
            self.resolve_method("finite_difference", "FSDP2 has no double backward")
        compiled = compiled_modules(pl_module) if method in ("double_backward", "auto") else []
        if compiled:
            where = ", ".join(f"`{n}`" if n else f"`{type(pl_module).__name__}` itself" for n in compiled)
            if method == "auto":
                self.resolve_method("finite_difference", f"torch.compile'd modules have no double backward ({where})")
        if compiled and method == "double_backward":
            raise RuntimeError(
                f"{type(self).__name__}(method='double_backward') differentiates a gradient, and torch.compile'd "
                f"modules have no double backward ({where}). Use method='finite_difference', which needs two "
                f"ordinary passes instead."
            )
        StepInterceptor.attach(trainer, pl_module).register(self, _run_intercepted)
        log_settings(trainer, self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._leave(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._leave(pl_module)

    def _leave(self, pl_module: pl.LightningModule) -> None:
        interceptor = StepInterceptor.of(pl_module)
        if interceptor is not None:
            interceptor.unregister(self)
        self._epoch.reset()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied, **self.seed.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict.get("applied", 0)
        self.seed.load_state_dict(state_dict)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch.reset()

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the epoch mean of every value as ``<name>_epoch`` (weighted by samples, over all ranks) into
        ``callback_metrics``, so ``EarlyStopping``/``ModelCheckpoint`` can monitor it whatever
        ``log_every_n_steps`` is. Not sent to the loggers, which keep one row per step."""
        if not trainer.barebones:  # barebones forbids self.log
            for name, value in self._epoch.compute().items():
                pl.LightningModule.log(pl_module, f"{name}_epoch", value, on_step=False, on_epoch=True, logger=False,
                                       batch_size=1)
        self._epoch.reset()

    def unsupported_when_sharded(self) -> str | None:
        """Why the callback, as configured, cannot run under FSDP2 (``ModelParallelStrategy``); None where it can."""
        return "it reads whole parameters"

    # -- per step ---------------------------------------------------------------------------------------
    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        """Run ``inner`` (the rest of the chain) on ``batch`` and return the step with this term added."""
        raise NotImplementedError

    def trainable_parameters(self, ctx: StepContext, why: str) -> list[Tensor]:
        """The module's parameters that require grad, or a clear error (``why``: what the callback cannot do)."""
        params = ctx.trainable_parameters()
        if not params:
            raise ValueError(
                f"{type(self).__name__}: `{type(ctx.module).__name__}` has no parameter that requires grad at global "
                f"step {ctx.global_step} (all frozen?), {why}. Unfreeze the parameters to train, or remove the "
                f"callback."
            )
        return params

    def loss_with_graph(self, objective: Objective) -> Tensor:
        """``step.loss``, or the error saying it has no autograd graph (nothing to differentiate)."""
        if not objective.loss.requires_grad:
            raise ValueError(f"{type(self).__name__}: the loss returned by `training_step` has no autograd graph.")
        return objective.loss

    def active_weight(self, ctx: StepContext) -> float:
        """Lazy regularization: weight × k on optimizer steps (``global_step``) divisible by k, else 0.

        ``trainer.global_step`` counts optimizer steps, so with ``accumulate_grad_batches`` every micro-batch
        of a penalized step is penalized, and it is checkpointed, so a resumed run keeps the schedule.
        """
        if ctx.global_step % self.every_n_steps != 0:
            return 0.0
        return self.weight * self.every_n_steps

    def step_generator(self, ctx: StepContext) -> torch.Generator:
        """A generator for what the callback draws (attack starts, VAT directions), seeded by (the run's seed,
        rank, ``global_step``, micro-batch within the step, the callback's order): :class:`RunSeed`.

        So a resumed run draws exactly what the uninterrupted one drew (the seed is checkpointed), and the draws do
        not consume the global RNG the user's own dropout uses.
        """
        draw = self._draw
        index = draw[1] + 1 if draw is not None and draw[0] == ctx.global_step else 0
        self._draw = (ctx.global_step, index)
        rank = ctx.strategy.global_rank if ctx.strategy is not None else 0
        device = next((p.device for p in ctx.module.parameters()), torch.device("cpu"))
        return self.seed.generator(device, rank, ctx.global_step, index, self.order)

    def check_and_log(self, ctx: StepContext, name: str, value: Tensor, batch_size: int | None = None) -> None:
        """Check ``value`` for NaN/Inf (with ``check_finite``), then :meth:`record`.

        In a Trainer the value joins the step's record, checked once before the optimizer step with the
        gradients (:mod:`lightning_gp.step._finite`: one host read a step, every DDP rank raising together).
        Outside a Trainer (``penalized_loss``) it is checked at once.
        """
        value = whole(value.detach())  # a norm over FSDP2's shards is a DTensor
        if self.check_finite:
            if ctx.values is not None:
                ctx.values.add(type(self).__name__, name, value)
            elif not math.isfinite(value):  # one host read, no isfinite kernel
                raise FloatingPointError(
                    f"{type(self).__name__}: `{name}` is {float(value)} (non-finite) at global step "
                    f"{ctx.global_step}. Lower the weight or the learning rate, or look for NaN/Inf in the inputs."
                )
        self.record(ctx, name, value, batch_size)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """The step's finiteness check (once per step, by whichever member comes first)."""
        interceptor = StepInterceptor.of(pl_module)
        values = None if interceptor is None else interceptor.step_values
        if values is None or not values.pending:
            return
        try:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            caller = caller_name(sorted(interceptor.members, key=lambda m: m.order))
            check_step(values, [p.grad for p in params], step=trainer.global_step, strategy=trainer.strategy,
                       scaled=grad_scaler(trainer) is not None, caller=caller,
                       grad_names=functools.partial(param_names, pl_module, params))
        finally:
            values.clear()

    def record(self, ctx: StepContext, name: str, value: Tensor, batch_size: int | None = None) -> None:
        """Keep ``value`` for the epoch mean, and log it on the steps the Trainer writes to its loggers: the mean over
        the DDP ranks weighted by ``batch_size`` (each rank's samples), what one process logs on the combined batch.

        Per step only every ``log_every_n_steps`` (:func:`lightning_gp._lightning.logging.should_log`): a ``self.log``
        call costs as much as a small model's step, and a value logged on another step is overwritten unread. All
        ranks take the same decision, so ``sync_dist`` cannot deadlock.
        """
        module = ctx.module
        if not isinstance(module, pl.LightningModule) or ctx.strategy is None or module.trainer.barebones:
            return  # outside a Trainer (manual use), or barebones (which forbids self.log): nothing to log to
        value = whole(value.detach())
        n = batch_size or 1
        epoch = module.trainer.current_epoch
        if self._values_epoch != epoch:  # no epoch hook under `penalized_loss`: reset here
            self._values_epoch = epoch
            self._epoch.reset()
        # a running sum, not a list: `penalized_loss` under manual optimization has no epoch hook to clear it
        self._epoch.update(name, value, weight=n)
        if should_log(module.trainer):  # batch_size given: a `training_step(self, dataloader_iter)` needs it
            pl.LightningModule.log(module, name, over_ranks(module.trainer, value, n), on_step=True, on_epoch=False,
                                   batch_size=n)
