"""What the penalty callbacks share: the step they change, its extra passes, scheduling, checks and logs.

The callbacks register with :class:`lightning_gp.interception.StepInterceptor`, the one wrapper of
``training_step``; it calls :func:`run_chain`, which nests the members in a fixed order (adversarial
training outermost, then the data, parameter and spectral penalties) and returns the output with
"loss" = loss + every term. Design notes: ``docs/design/interception.md``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn
from torchmetrics import MeanMetric
from typing_extensions import override

from lightning_gp._compat import compiled_modules, fabric_autocast_dtype
from lightning_gp._finite import StepValues, check_step, grad_scaler, param_names
from lightning_gp._logging import should_log
from lightning_gp._module_state import untouched
from lightning_gp._support import check_batch_step, check_bool, check_number, check_strategy, init_repr
from lightning_gp.functional._autograd import autograd_leaves, linearised
from lightning_gp.functional._checks import check_positive_int
from lightning_gp.functional.layer_output import forward_pass
from lightning_gp.functional.precision import compute_dtype
from lightning_gp.interception import StepInterceptor, muted_logging


@dataclass
class Step:
    """What a training step produced: the raw loss, the terms the callbacks added, the user's output.

    The objective to backpropagate is ``stand_in + extra``. ``stand_in`` stands for the raw loss: the loss
    itself, or, once a finite-difference callback has taken ∇L w.r.t. every autograd leaf of the loss
    (:meth:`loss_grads`), the linearised loss (:func:`linearised`: Σ⟨v, ∇ᵥL⟩ with detached gradients, plus
    a constant): the same value and the same gradient, but the final backward no longer runs through the
    loss's graph a second time (that graph's backward was already done once to get the gradients).
    """

    loss: Tensor
    output: Any
    extra: Tensor | None = None
    surrogate: Tensor | None = None
    grads: dict[int, tuple[Tensor, Tensor]] | None = None  # id(leaf) → (leaf, ∇_leaf L), see loss_grads

    @property
    def stand_in(self) -> Tensor:
        """A tensor with the loss's value and the loss's gradient (the loss itself until it is linearised)."""
        return self.loss if self.surrogate is None else self.surrogate

    @property
    def objective(self) -> Tensor:
        return self.stand_in if self.extra is None else self.stand_in + self.extra

    def add(self, term: Tensor) -> Step:
        """This step with ``term`` added to the objective."""
        extra = term if self.extra is None else self.extra + term
        return Step(loss=self.loss, output=self.output, extra=extra, surrogate=self.surrogate, grads=self.grads)

    def loss_grads(self, retain: bool = True) -> Step:
        """This step with ∇L w.r.t. every autograd leaf of the loss, and the loss linearised (see above).

        One backward through the loss's graph (``retain``: whether an outer callback still differentiates the
        loss; a compiled backward with donated buffers allows no ``retain_graph``), for all
        leaves at once — the parameters, the input leaf of a data penalty, any other tensor the loss depends
        on — so the final backward deposits exactly the gradients the loss's own graph would have, into the
        same tensors (parameters the loss does not use stay without a gradient, as before). A no-op when a
        callback already did it.
        """
        if self.grads is not None:
            return self
        leaves = autograd_leaves(self.loss)
        grads = torch.autograd.grad(self.loss, leaves, retain_graph=retain, allow_unused=True) if leaves else ()
        pairs = {id(v): (v, g) for v, g in zip(leaves, grads, strict=True) if g is not None}
        surrogate = linearised(self.loss, list(pairs.values()))
        return Step(loss=self.loss, output=self.output, extra=self.extra, surrogate=surrogate, grads=pairs)

    def grad_of(self, tensor: Tensor) -> Tensor | None:
        """∇L w.r.t. ``tensor`` (after :meth:`loss_grads`); None when the loss does not depend on it."""
        assert self.grads is not None
        pair = self.grads.get(id(tensor))
        return None if pair is None else pair[1]

    def finalize(self) -> Any:
        if isinstance(self.output, Mapping):
            out = dict(self.output)
            out["loss"] = self.objective
            return out
        return self.objective


def extract_loss(output: Any, owners: str) -> Tensor:
    """The scalar loss in a ``training_step`` output (a tensor or a mapping with "loss"), or a clear error."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if loss is None:
        raise ValueError(
            f"`training_step` returned {'a dict without a loss' if isinstance(output, Mapping) else 'None'}, "
            f"but {owners} must add a penalty to the loss. Return the loss tensor (or a dict with key "
            f"'loss'); to skip a batch, remove the callback or return a zero loss."
        )
    if not isinstance(loss, Tensor):
        raise TypeError(f"`training_step` returned a loss of type {type(loss).__name__}; {owners} needs a tensor.")
    if loss.numel() != 1:
        raise ValueError(
            f"`training_step` returned a loss of shape {tuple(loss.shape)}; {owners} needs a scalar "
            f"(the batch mean, e.g. `F.cross_entropy(logits, y)`)."
        )
    return loss.reshape(())


class StepContext:
    """One training step as seen by the callbacks: the module, the user's step function and its arguments.

    ``strategy`` is the Trainer's (None outside a Trainer): collectives go through it (:meth:`reduce`,
    :meth:`broadcast`, :meth:`all_gather`), and without it they are the identity.
    """

    def __init__(self, module: nn.Module, step_fn: Callable[..., Any], args: tuple, kwargs: dict,
                 global_step: int, owners: str, strategy: Strategy | None = None,
                 values: StepValues | None = None) -> None:
        self.module = module
        self.values = values  # the step's record for the finiteness check (None: check each value at once)
        self.members: list[PenaltyCallback] = []  # the chain, outermost first (set by run_chain)
        self.autocast_hint = fabric_autocast_dtype(module)  # Fabric's autocast lives inside the forward only
        self.step_fn = step_fn
        self.rest_args = args[1:]
        self.kwargs = kwargs
        self.global_step = global_step
        self.owners = owners
        self.strategy = strategy

    @property
    def world_size(self) -> int:
        return 1 if self.strategy is None else self.strategy.world_size

    def reduce(self, tensor: Tensor, op: Literal["sum", "max"]) -> Tensor:
        """``tensor`` summed (or maxed) over the ranks; a new tensor."""
        if self.world_size == 1:
            return tensor
        return self.strategy.reduce(tensor.clone(), reduce_op=op)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """Rank 0's ``tensor`` on every rank (every rank takes rank 0's decision)."""
        return tensor if self.world_size == 1 else self.strategy.broadcast(tensor, src=0)

    def mean_over_ranks(self, tensor: Tensor) -> Tensor:
        """The mean of ``tensor`` over the ranks, differentiable: the backward sends each rank its share."""
        if self.world_size == 1:
            return tensor
        return self.strategy.all_gather(tensor, sync_grads=True).mean(dim=0)

    def compute_dtype(self, t: Tensor) -> torch.dtype:
        """The dtype the step's passes compute ``t``'s kind of values in (:func:`functional.precision.compute_dtype`,
        with the autocast of a Fabric ``bf16-mixed``/``16-mixed`` module, which is active only inside its forward)."""
        dtype = compute_dtype(t)
        hint = self.autocast_hint
        if hint is not None and dtype.is_floating_point and torch.finfo(hint).eps > torch.finfo(dtype).eps:
            return hint
        return dtype

    def loss_graph_needed_outside(self, member: PenaltyCallback) -> bool:
        """Whether a callback outer to ``member`` differentiates the loss's own graph after ``member`` returns
        (adversarial training, a double-backward penalty): then ``member`` must retain it."""
        outer = self.members[: self.members.index(member)] if member in self.members else self.members
        return any(m.needs_loss_graph for m in outer)

    def primary(self, batch: Any) -> Step:
        """The user's step, as Lightning would run it (it logs, it updates BatchNorm statistics)."""
        with forward_pass():
            out = self.step_fn(batch, *self.rest_args, **self.kwargs)
        if out is None:
            raise SkipBatch
        loss = extract_loss(out, self.owners)
        if self.values is not None:
            self.values.add_loss(loss)
        return Step(loss=loss, output=out)

    def extra_loss(self, batch: Any) -> Tensor:
        """The raw loss of an extra pass: no other callback, no logging, and what the step changes on the module
        (buffers, metrics, counters: :mod:`lightning_gp._module_state`) put back after it."""
        with muted_logging(self.module), untouched(self.module), forward_pass():
            out = self.step_fn(batch, *self.rest_args, **self.kwargs)
        if out is None:
            raise SkipBatch
        return extract_loss(out, self.owners)


class SkipBatch(Exception):
    """``training_step`` returned None (Lightning's way to skip a batch): the chain stops and returns None."""


def run_chain(module: nn.Module, step_fn: Callable[..., Any], members: list[PenaltyCallback], args: tuple,
              kwargs: dict, global_step: int, strategy: Strategy | None = None,
              values: StepValues | None = None) -> Any:
    """Run ``step_fn`` with every member's term added; returns the output with "loss" = the objective.

    A pass of ``training_step`` that returns None skips the batch, as in Lightning: no term, no further
    pass, no log, and None is returned.
    """
    members = sorted(members, key=lambda m: m.order)
    owners = " and ".join(type(m).__name__ for m in members) or "lightning_gp"
    if not args and "batch" not in kwargs:
        raise TypeError("`training_step` was called without a batch.")
    if not args:
        kwargs = dict(kwargs)
        args = (kwargs.pop("batch"),)
    ctx = StepContext(module, step_fn, args, kwargs, global_step, owners, strategy, values)
    ctx.members = members

    def build(i: int) -> Callable[[Any], Step]:
        if i == len(members):
            return ctx.primary
        member, inner = members[i], build(i + 1)
        return lambda batch: member.apply(ctx, batch, inner)

    mark = None if values is None else (len(values.losses), len(values.values))
    try:
        step = build(0)(args[0])
    except SkipBatch:
        if values is not None:  # nothing of a skipped batch is checked: it never reaches a backward
            del values.losses[mark[0]:], values.values[mark[1]:]
            values.pending = bool(values.losses or values.values)
        return None
    if values is not None:
        values.batches.append(args[0])
    return step.finalize()


def _run_intercepted(interceptor: StepInterceptor, step_fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The interceptor's runner for the penalty callbacks."""
    trainer = interceptor.trainer
    values = None
    if any(getattr(m, "check_finite", True) for m in interceptor.members):
        if interceptor.step_values is None:
            interceptor.step_values = StepValues()
        values = interceptor.step_values
    return run_chain(interceptor.module, step_fn, interceptor.members, args, kwargs, trainer.global_step,
                     trainer.strategy, values)


class PenaltyCallback(Callback):
    """Base of the loss-changing callbacks: registers with the interceptor, schedules, checks and logs."""

    #: Nesting position in the shared wrapper (smaller = outer).
    order = 10
    #: Whether :meth:`apply` differentiates the loss of the inner chain through its graph (after it returned).
    needs_loss_graph = False
    #: ``penalty/<log_name>`` in the logs.
    log_name = "penalty"

    def __init__(self, weight: float, every_n_steps: int = 1, check_finite: bool = True) -> None:
        owner = type(self).__name__
        self.weight = check_number(weight, "weight", owner)
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.check_finite = check_bool(check_finite, "check_finite", owner)
        self.applied = 0  # how many steps carried the term (the schedule itself follows trainer.global_step)
        self._epoch_values: dict[str, tuple[Tensor, int]] = {}  # name → (Σ value·samples, Σ samples): O(1)

    def __repr__(self) -> str:
        return init_repr(self)

    @property
    @override
    def state_key(self) -> str:
        """Identifies the callback in checkpoints: its class and what it applies to (:meth:`state_key_fields`),
        never a hyperparameter a user may tune on resume. Computed once (Lightning reads it on every hook)."""
        key = self.__dict__.get("_state_key")
        if key is None:
            fields = self.state_key_fields()
            key = self._generate_state_key(**fields) if fields else type(self).__qualname__
            self.__dict__["_state_key"] = key
        return key

    def state_key_fields(self) -> dict[str, Any]:
        """What tells two instances of the callback apart in a checkpoint (e.g. the input they perturb)."""
        return {}

    # -- wiring ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer, type(self).__name__)
        check_batch_step(pl_module, type(self).__name__)
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} works with automatic optimization. `{type(pl_module).__name__}` uses "
                f"manual optimization: remove the callback and call "
                f"`lightning_gp.manual.penalized_loss(self, loss_fn, batch, [{type(self).__name__}(...)])` "
                f"before `self.manual_backward`."
            )
        method = getattr(self, "method", None)
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
        self._epoch_values = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict.get("applied", 0)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_values = {}

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the epoch mean of every value as ``<name>_epoch`` (weighted by samples, over all ranks) into
        ``callback_metrics``, so ``EarlyStopping``/``ModelCheckpoint`` can monitor it whatever
        ``log_every_n_steps`` is. Not sent to the loggers, which keep one row per step."""
        if not trainer.barebones:  # barebones forbids self.log
            for name, (total, count) in self._epoch_values.items():
                pl.LightningModule.log(pl_module, f"{name}_epoch", epoch_mean(total, count), on_step=False,
                                       on_epoch=True, logger=False, batch_size=count)
        self._epoch_values = {}

    # -- per step ---------------------------------------------------------------------------------------
    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Step]) -> Step:
        """Run ``inner`` (the rest of the chain) on ``batch`` and return the step with this term added."""
        raise NotImplementedError

    def active_weight(self, ctx: StepContext) -> float:
        """Lazy regularization: weight × k on optimizer steps (``global_step``) divisible by k, else 0.

        ``trainer.global_step`` counts optimizer steps, so with ``accumulate_grad_batches`` every micro-batch
        of a penalized step is penalized, and it is checkpointed, so a resumed run keeps the schedule.
        """
        if ctx.global_step % self.every_n_steps != 0:
            return 0.0
        return self.weight * self.every_n_steps

    def step_generator(self, ctx: StepContext) -> torch.Generator:
        """A generator for what the callback draws (attack starts, VAT directions), seeded by
        (``torch.initial_seed()``, rank, ``global_step``, micro-batch within the step, the callback's order).

        So a resumed run draws exactly what the uninterrupted one drew (``seed_everything`` sets the initial
        seed), and the draws do not consume the global RNG the user's own dropout uses.
        """
        draw = self.__dict__.get("_draw")
        index = draw[1] + 1 if draw is not None and draw[0] == ctx.global_step else 0
        self.__dict__["_draw"] = (ctx.global_step, index)
        rank = ctx.strategy.global_rank if ctx.strategy is not None else 0
        device = next((p.device for p in ctx.module.parameters()), torch.device("cpu"))
        seed = hash((torch.initial_seed(), rank, ctx.global_step, index, self.order)) % (2**63)
        return torch.Generator(device=device).manual_seed(seed)

    def check_and_log(self, ctx: StepContext, name: str, value: Tensor, batch_size: int | None = None) -> None:
        """Check ``value`` for NaN/Inf (with ``check_finite``), then :meth:`record`.

        In a Trainer the value joins the step's record, checked once before the optimizer step with the
        gradients (:mod:`lightning_gp._finite`: one host read a step, every DDP rank raising together).
        Outside a Trainer (``penalized_loss``) it is checked at once.
        """
        value = value.detach()
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
            owners = " and ".join(sorted({type(m).__name__ for m in interceptor.members}))
            check_step(values, [p.grad for p in params], step=trainer.global_step, strategy=trainer.strategy,
                       scaled=grad_scaler(trainer) is not None, owners=owners,
                       grad_names=functools.partial(param_names, pl_module, params))
        finally:
            values.clear()

    def record(self, ctx: StepContext, name: str, value: Tensor, batch_size: int | None = None) -> None:
        """Keep ``value`` for the epoch mean, and log it on the steps the Trainer writes to its loggers.

        Per step only every ``log_every_n_steps`` (:func:`lightning_gp._logging.should_log`): a ``self.log``
        call costs 1–2 ms in Lightning 2.6, and a value logged on another step is overwritten unread. All
        ranks take the same decision, so ``sync_dist`` cannot deadlock.
        """
        module = ctx.module
        if not isinstance(module, pl.LightningModule) or ctx.strategy is None or module.trainer.barebones:
            return  # outside a Trainer (manual use), or barebones (which forbids self.log): nothing to log to
        value = value.detach()
        n = batch_size or 1
        epoch = module.trainer.current_epoch
        if self.__dict__.get("_values_epoch") != epoch:  # no epoch hook under `penalized_loss`: reset here
            self.__dict__["_values_epoch"] = epoch
            self._epoch_values = {}
        total, count = self._epoch_values.get(name, (0.0, 0))
        # a running sum, not a list: `penalized_loss` under manual optimization has no epoch hook to clear it
        self._epoch_values[name] = (total + value.float() * n, count + n)
        if should_log(module.trainer):  # batch_size given: a `training_step(self, dataloader_iter)` needs it
            pl.LightningModule.log(module, name, value, on_step=True, on_epoch=False, sync_dist=True, batch_size=n)


def epoch_mean(total: Tensor, count: int) -> Tensor:
    """The sample-weighted mean over all ranks of values whose weighted sum on this rank is ``total`` over
    ``count`` samples (a torchmetrics ``MeanMetric``: two summed states, so ranks weigh by their samples)."""
    metric = MeanMetric(sync_on_compute=True).to(total.device)
    metric.update(total / count, torch.tensor(float(count), device=total.device))
    return metric.compute()
