"""Shared machinery: how a callback changes the loss of an unchanged LightningModule.

Lightning has no hook between ``training_step`` and ``backward`` that may change the loss, and a second
backward per forward breaks DDP's reducer (each parameter's gradient hook must fire once per forward). So
each callback *wraps* the module's ``training_step`` (an instance attribute, installed in ``setup`` and
removed in ``teardown``/``on_exception``): the wrapper returns ``loss + penalty``, and Lightning runs its one
ordinary backward on it. Under DDP, Lightning calls ``training_step`` from inside
``DistributedDataParallel.forward`` (``strategy._forward_redirection`` looks the method up on the module at
call time), so the penalty's gradient is all-reduced with the rest, with default DDP settings. Gradients
taken inside the wrapper (``autograd.grad`` w.r.t. the input or with ``create_graph``) do not run DDP's
parameter hooks; only the final backward does.

Several callbacks share one wrapper (a :class:`_Chain` on the module) and nest in a fixed order, whatever
their order in ``Trainer(callbacks=...)``: adversarial training outermost (it decides which batch is
trained on), then the data penalty, the parameter penalty, the spectral penalty. Each one sees the *raw*
loss that ``training_step`` returned (penalties are never differentiated through each other) and adds its
term to the objective. The finite-difference callbacks take ∇L w.r.t. every leaf in one backward and then
linearise L in the objective (:meth:`Step.loss_grads`), so however many of them are chained, the loss's
graph is backpropagated once and the final backward adds only the second passes' graphs.

The penalties are computed and checked for NaN/Inf on every step, but logged (``self.log``, 1–2 ms a
call in Lightning 2.6) only on the steps whose metrics the Trainer writes to its loggers, every
``log_every_n_steps`` (:func:`lightning_gp._logging.should_log`, Lightning's own condition).

Extra passes (attack steps, the second point of a finite difference) call the user's ``training_step``
directly (:meth:`StepContext.extra_loss`): the other callbacks are not applied, ``self.log`` calls are
dropped, and BatchNorm running statistics are restored afterwards, so each training step updates them
once, in the primary pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from typing_extensions import override

from lightning_gp._logging import should_log
from lightning_gp.functional._autograd import autograd_leaves, linearised
from lightning_gp.functional._checks import check_non_negative, check_positive_int
from lightning_gp.functional._rng import rng_state as rng_state
from lightning_gp.functional._rng import set_rng_state as set_rng_state

_CHAIN_ATTR = "_lightning_gp_chain"


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

    def loss_grads(self) -> Step:
        """This step with ∇L w.r.t. every autograd leaf of the loss, and the loss linearised (see above).

        One backward through the loss's graph (``retain_graph``: other terms may still need it), for all
        leaves at once — the parameters, the input leaf of a data penalty, any other tensor the loss depends
        on — so the final backward deposits exactly the gradients the loss's own graph would have, into the
        same tensors (parameters the loss does not use stay without a gradient, as before). A no-op when a
        callback already did it.
        """
        if self.grads is not None:
            return self
        leaves = autograd_leaves(self.loss)
        grads = torch.autograd.grad(self.loss, leaves, retain_graph=True, allow_unused=True) if leaves else ()
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


@contextlib.contextmanager
def frozen_norm_stats(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every BatchNorm/InstanceNorm layer in training mode on exit.

    Restored through ``.data`` on purpose: BatchNorm's backward node holds the running-stat tensors (it
    does not use their values in training mode), and an ordinary in-place copy would bump their version
    counter and make the primary pass's backward fail.
    """
    saved = [
        (buf, buf.detach().clone())
        for m in module.modules()
        if isinstance(m, _NormBase) and m.training and m.track_running_stats
        for buf in (m.running_mean, m.running_var, m.num_batches_tracked)
        if buf is not None
    ]
    try:
        yield
    finally:
        for buf, value in saved:
            buf.data.copy_(value)


@contextlib.contextmanager
def muted_logging(module: nn.Module) -> Iterator[None]:
    """Drop ``self.log``/``self.log_dict`` calls made while the block runs (extra passes must not log twice)."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            module.__dict__.pop(name, None)
        module.__dict__.update(saved)


class _Call(nn.Module):
    """Lets ``torch.func.functional_call`` run a *method* (the user's training_step) with swapped parameters."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self._fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)


class StepContext:
    """One training step as seen by the callbacks: the module, the user's step function and its arguments."""

    def __init__(self, module: nn.Module, step_fn: Callable[..., Any], args: tuple, kwargs: dict,
                 global_step: int, owners: str) -> None:
        self.module = module
        self.step_fn = step_fn
        self.rest_args = args[1:]
        self.kwargs = kwargs
        self.global_step = global_step
        self.owners = owners

    def primary(self, batch: Any) -> Step:
        """The user's step, as Lightning would run it (it logs, it updates BatchNorm statistics)."""
        out = self.step_fn(batch, *self.rest_args, **self.kwargs)
        return Step(loss=extract_loss(out, self.owners), output=out)

    def extra_loss(self, batch: Any, params: dict[str, Tensor] | None = None) -> Tensor:
        """The raw loss of an extra pass: no other callback, no logging, BatchNorm statistics untouched.

        ``params`` (name → tensor, names as in ``module.named_parameters()``) evaluates the step at other
        parameter values without touching the module's own (their autograd graph stays valid).
        """
        with muted_logging(self.module), frozen_norm_stats(self.module):
            if params is None:
                out = self.step_fn(batch, *self.rest_args, **self.kwargs)
            else:
                caller = _Call(self.module, self.step_fn)
                named = {f"module.{k}": v for k, v in params.items()}
                out = torch.func.functional_call(caller, named, (batch, *self.rest_args), self.kwargs)
        return extract_loss(out, self.owners)


class _Chain:
    """The one wrapper installed on a module's ``training_step``; the callbacks register with it."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.had_instance_attr = "training_step" in module.__dict__
        self.original = module.training_step
        self.members: list[PenaltyCallback] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        trainer = self.module._trainer
        step = trainer.global_step if trainer is not None else 0
        return run_chain(self.module, self.original, self.members, args, kwargs, step)

    @staticmethod
    def install(module: pl.LightningModule, member: PenaltyCallback) -> None:
        chain = module.__dict__.get(_CHAIN_ATTR)
        if chain is None:
            chain = _Chain(module)
            module.__dict__[_CHAIN_ATTR] = chain

            # A real function (Lightning's `is_overridden` reads `__code__`); `wraps` keeps the user's
            # signature visible to `inspect.signature` (Lightning inspects it, e.g. for `dataloader_iter`).
            @functools.wraps(chain.original)
            def training_step(*args: Any, **kwargs: Any) -> Any:
                return chain(*args, **kwargs)

            module.training_step = training_step
        if member not in chain.members:
            chain.members.append(member)

    @staticmethod
    def uninstall(module: pl.LightningModule, member: PenaltyCallback) -> None:
        chain = module.__dict__.get(_CHAIN_ATTR)
        if chain is None:
            return
        if member in chain.members:
            chain.members.remove(member)
        if not chain.members:
            del module.__dict__[_CHAIN_ATTR]
            if chain.had_instance_attr:
                module.training_step = chain.original
            else:
                module.__dict__.pop("training_step", None)


def run_chain(module: nn.Module, step_fn: Callable[..., Any], members: list[PenaltyCallback], args: tuple,
              kwargs: dict, global_step: int) -> Any:
    """Run ``step_fn`` with every member's term added; returns the output with "loss" = the objective."""
    members = sorted(members, key=lambda m: m.order)
    owners = " and ".join(type(m).__name__ for m in members) or "lightning_gp"
    if not args and "batch" not in kwargs:
        raise TypeError("`training_step` was called without a batch.")
    if not args:
        kwargs = dict(kwargs)
        args = (kwargs.pop("batch"),)
    ctx = StepContext(module, step_fn, args, kwargs, global_step, owners)

    def build(i: int) -> Callable[[Any], Step]:
        if i == len(members):
            return ctx.primary
        member, inner = members[i], build(i + 1)
        return lambda batch: member.apply(ctx, batch, inner)

    return build(0)(args[0]).finalize()


class PenaltyCallback(Callback):
    """Base of the loss-changing callbacks: installs the wrapper, schedules, checks and logs the term."""

    #: Nesting position in the shared wrapper (smaller = outer).
    order = 10
    #: ``penalty/<log_name>`` in the logs.
    log_name = "penalty"

    def __init__(self, weight: float, every_n_steps: int = 1, check_finite: bool = True) -> None:
        self.weight = check_non_negative(weight, "weight")
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.check_finite = check_finite
        self.applied = 0  # how many steps carried the term (the schedule itself follows trainer.global_step)

    @property
    @override
    def state_key(self) -> str:
        """Identifies the callback in checkpoints, from its defining arguments (:meth:`state_key_fields`).

        Computed once: Lightning reads it on every hook call (for the profiler's labels), and formatting the
        arguments each time is a measurable share of a small model's step.
        """
        key = self.__dict__.get("_state_key")
        if key is None:
            key = self.__dict__["_state_key"] = self._generate_state_key(**self.state_key_fields())
        return key

    def state_key_fields(self) -> dict[str, Any]:
        """The constructor arguments that tell two instances of the callback apart in a checkpoint."""
        return {}

    # -- wiring ---------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(self).__name__} works with automatic optimization. `{type(pl_module).__name__}` uses "
                f"manual optimization: remove the callback and call "
                f"`lightning_gp.manual.penalized_loss(self, loss_fn, batch, [{type(self).__name__}(...)])` "
                f"before `self.manual_backward`."
            )
        _Chain.install(pl_module, self)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _Chain.uninstall(pl_module, self)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        _Chain.uninstall(pl_module, self)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"applied": self.applied}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.applied = state_dict.get("applied", 0)

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

    def check_and_log(self, ctx: StepContext, name: str, value: Tensor, batch_size: int | None = None) -> None:
        """Raise on a non-finite value (every step), log it (on the steps the loggers write, see below)."""
        value = value.detach()
        # Checked on every step, not only on logging steps, so the error names the step where it happened
        # and no update is taken with a NaN gradient (one host sync per step on GPU; free on CPU).
        if self.check_finite and not math.isfinite(value):  # one host read, no isfinite kernel
            raise FloatingPointError(
                f"{type(self).__name__}: `{name}` is {float(value)} (non-finite) at global step "
                f"{ctx.global_step}. Lower the weight or the learning rate, or look for NaN/Inf in the inputs."
            )
        log_metric(ctx.module, name, value, batch_size)


def log_metric(module: nn.Module, name: str, value: Tensor, batch_size: int | None = None) -> None:
    """Log per step, averaged over DDP ranks (each rank's value is a mean over equally many samples).

    Only on the steps whose metrics the Trainer writes to its loggers (every ``log_every_n_steps``, see
    :func:`lightning_gp._logging.should_log`): a ``self.log`` call costs 1–2 ms in Lightning 2.6, and a value
    logged on another step would be overwritten unread. All ranks take the same decision (``sync_dist``).
    """
    if not isinstance(module, pl.LightningModule) or not should_log(module._trainer):
        return
    pl.LightningModule.log(module, name, value, on_step=True, on_epoch=False, sync_dist=True, batch_size=batch_size)


def distributed_world() -> int:
    """The DDP world size, 1 when torch.distributed is not running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
