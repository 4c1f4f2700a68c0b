"""One training step run through the penalty callbacks: the step's context, its passes, and the chain.

:class:`~lightning_gp.step.interception.StepInterceptor`, the one wrapper of ``training_step``, calls
:func:`run_chain`, which nests the members in the fixed order of :data:`ORDER` (flooding outermost, then adversarial
training, the data, parameter and spectral penalties, VAT, and SAM innermost) and returns the output with "loss" =
loss + every term. The members are
duck-typed (:class:`ChainMember`): anything with ``order``, ``needs_loss_graph`` and ``apply``.
Design notes: ``docs/design/interception.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, Protocol

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import Tensor, nn

from lightning_gp._lightning.private import fabric_autocast_dtype
from lightning_gp.functional._rng import RNGState, forked_rng, replayed_rng
from lightning_gp.functional._sharded import Sharding, fsdp_modules, is_sharded, sharded
from lightning_gp.functional.layer_output import forward_pass
from lightning_gp.functional.precision import compute_dtype
from lightning_gp.step._cost import STEP, span
from lightning_gp.step._finite import StepValues
from lightning_gp.step._module_state import untouched
from lightning_gp.step._objective import Objective, caller_name, extract_loss
from lightning_gp.step.interception import muted_logging

#: Where each penalty callback sits in the chain, outermost first (:func:`run_chain` sorts by it). A member's number
#: also seeds its random generator (``PenaltyCallback.generator``), so the numbers stay what they are.
ORDER: dict[str, int] = {
    "AdversarialWeightPerturbation": -3,  # it moves θ when the adversarial callback inside it has its objective ready
    "GradAlign": -2,  # its gradients are of the clean batch's loss, outside adversarial training's batch
    "Flooding": -1,  # it floods the loss the user's step returned, before any other term is added
    "AdversarialTraining": 0,  # the passes inside it see the adversarial batch
    "DataGradientPenalty": 1,
    "ParameterGradientPenalty": 2,
    "SpectralNormPenalty": 3,
    "VirtualAdversarialTraining": 4,
    "SharpnessAwareMinimization": 5,  # it perturbs θ for the loss of the pass it wraps (the adversarial one)
    "TRADES": 6,  # its KL is added to the clean loss the user's step returned
    "MART": 7,  # it reads the logits of the user's own step (its clean pass) and replaces its loss
}
#: The place of a member the table does not list: inside all of them.
DEFAULT_ORDER = 10


class ChainMember(Protocol):
    """What :func:`run_chain` needs of a member (the penalty callbacks); a member may also define
    ``prepare(ctx, batch)``, which the chain calls on every member before any ``apply`` (the penalties decide what
    ``method="auto"`` stands for there)."""

    order: int
    needs_loss_graph: bool

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective: ...


class StepContext:
    """One training step as seen by the callbacks: the module, the user's step function and its arguments.

    ``strategy`` is the Trainer's (None outside a Trainer): collectives go through it (:meth:`reduce`,
    :meth:`broadcast`, :meth:`all_gather`), and without it they are the identity.
    """

    def __init__(self, module: nn.Module, step_fn: Callable[..., Any], args: tuple, kwargs: dict,
                 global_step: int, caller: str, strategy: Strategy | None = None,
                 values: StepValues | None = None, lightning_backward: bool = False) -> None:
        self.module = module
        # Lightning's automatic backward of the objective follows, then the callbacks' `on_after_backward` (a
        # Trainer's step); False under `penalized_loss`, where the user's code owns the backward
        self.lightning_backward = lightning_backward
        self.values = values  # the step's record for the finiteness check (None: check each value at once)
        self.members: list[ChainMember] = []  # the chain, outermost first (set by run_chain)
        # members that move the weights against an adversarial objective once it is ready (AWP); see
        # `adversarial_objective`
        self.weight_perturbers: list[Callable[[Callable[[], Tensor]], None]] = []
        # ∇ of the user's loss w.r.t. a batch input tensor at the clean batch, by id of that tensor, where a member
        # computed it anyway (FGSM from x): GradAlign's first gradient, not taken twice. None unless a member asks
        # for them (GradAlign sets a dict before its inner members run), so no step holds one it does not need
        self.clean_input_gradients: dict[int, Tensor] | None = None
        self.autocast_hint = fabric_autocast_dtype(module)  # Fabric's autocast lives inside the forward only
        self.step_fn = step_fn
        self.rest_args = args[1:]
        self.kwargs = kwargs
        self.global_step = global_step
        self.caller = caller
        self.strategy = strategy
        # FSDP2: the shards the step perturbs, and how its gradients are taken (functional/_sharded.py). Only looked
        # for where the strategy can shard (none given: a manual or Fabric loop), not on every DDP step.
        fsdp = fsdp_modules(module) if strategy is None or isinstance(strategy, ModelParallelStrategy) else []
        self.sharding = Sharding(fsdp, module) if fsdp else None

    def adversarial_objective(self, objective: Callable[[], Tensor]) -> None:
        """An adversarial callback has found its adversarial examples and is about to train on them: ``objective()``
        computes its loss at the current weights (on extra passes). The members that perturb the weights against it
        (AWP) move them now, so the training passes that follow run at the moved weights."""
        for perturb in list(self.weight_perturbers):
            perturb(objective)

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters that require grad: under FSDP2 the shards (whatever the forward registered since)."""
        if self.sharding is not None:
            return list(self.sharding.params)
        return [p for p in self.module.parameters() if p.requires_grad]

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

    def average_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean over the ranks of each of ``tensors``, without a graph (:func:`averaged_over_ranks`)."""
        return averaged_over_ranks(self.strategy, tensors)

    def gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor``, stacked along a new first dimension (``(1, ...)`` on one rank)."""
        if self.world_size == 1:
            return tensor.unsqueeze(0)
        return self.strategy.all_gather(tensor).reshape(self.world_size, *tensor.shape)

    def mean_over_ranks(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean of each of ``tensors`` over the ranks, differentiable (the backward sends each rank its share):
        one all-gather of them flattened into one buffer."""
        if self.world_size == 1:
            return list(tensors)
        return _shaped_like(self.strategy.all_gather(_flat(tensors), sync_grads=True).mean(dim=0), tensors)

    def compute_dtype(self, t: Tensor) -> torch.dtype:
        """The dtype the step's passes compute ``t``'s kind of values in (:func:`functional.precision.compute_dtype`,
        with the autocast of a Fabric ``bf16-mixed``/``16-mixed`` module, which is active only inside its forward)."""
        dtype = compute_dtype(t)
        hint = self.autocast_hint
        if hint is not None and dtype.is_floating_point and torch.finfo(hint).eps > torch.finfo(dtype).eps:
            return hint
        return dtype

    def loss_graph_needed_outside(self, member: ChainMember) -> bool:
        """Whether a callback outer to ``member`` differentiates the loss's own graph after ``member`` returns
        (adversarial training, a double-backward penalty): then ``member`` must retain it."""
        outer = self.members[: self.members.index(member)] if member in self.members else self.members
        return any(m.needs_loss_graph for m in outer)

    def primary(self, batch: Any) -> Objective:
        """The user's step, as Lightning would run it (it logs, it updates BatchNorm statistics)."""
        with forward_pass(), span(STEP):
            out = self.step_fn(batch, *self.rest_args, **self.kwargs)
        if out is None:
            raise SkipBatch
        loss = extract_loss(out, self.caller)
        if self.values is not None:
            self.values.add_loss(loss)
        return Objective(loss=loss, output=out)

    def extra_loss(self, batch: Any, rng: PassRNG = None) -> Tensor:
        """The raw loss of an extra pass (:func:`extra_pass`, on the random stream ``rng``): no other callback, no
        logging, and what the step changes on the module put back after it."""
        with extra_pass(self.module, rng):
            out = self.step_fn(batch, *self.rest_args, **self.kwargs)
        if out is None:
            raise SkipBatch
        return extract_loss(out, self.caller)


#: The random stream an extra pass draws from (dropout): None, the step's own, as a hand-written loop's extra forward
#: would (VAT's logits); "fork", a copy of it, put back after (the run's stream untouched: the reduction check); an
#: :class:`~lightning_gp.functional._rng.RNGState` captured before an earlier pass, replayed (that pass's dropout
#: masks: a finite difference's second pass, SAM's perturbed pass); an int, a stream seeded with it (the sharpness
#: monitor's fixed masks).
PassRNG = None | Literal["fork"] | RNGState | int


@contextlib.contextmanager
def extra_pass(module: nn.Module, rng: PassRNG = None) -> Iterator[None]:
    """An extra pass of the user's code that leaves no trace: its ``self.log`` calls dropped, what it changes on the
    module put back (:func:`untraced`), marked as a pass of its own
    (:func:`~lightning_gp.functional.layer_output.forward_pass`), on the random stream ``rng`` (:data:`PassRNG`).
    The one isolation of every extra pass: the callbacks' extra losses, VAT's logits and the monitors' re-runs of
    ``training_step``."""
    with muted_logging(module), untraced(module, rng), forward_pass():
        yield


@contextlib.contextmanager
def untraced(module: nn.Module, rng: PassRNG = None) -> Iterator[None]:
    """What a block changes on ``module`` (buffers, metrics, counters: :mod:`lightning_gp.step._module_state`) put
    back after it, on the random stream ``rng``: the part of :func:`extra_pass` a monitor's whole measurement
    shares."""
    with _stream(module, rng), untouched(module):
        yield


def _stream(module: nn.Module, rng: PassRNG) -> contextlib.AbstractContextManager[None]:
    if rng is None:
        return contextlib.nullcontext()
    if isinstance(rng, RNGState):
        return replayed_rng(rng)
    devices = {t.device for t in module.parameters()} | {t.device for t in module.buffers()}
    if rng == "fork":
        return forked_rng(*devices)
    if isinstance(rng, int) and not isinstance(rng, bool):
        return forked_rng(*devices, seed=rng)
    raise TypeError(f"extra_pass: `rng` must be None, 'fork', an RNGState or an int seed, got {rng!r}.")


def averaged_over_ranks(strategy: Strategy | None, tensors: list[Tensor]) -> list[Tensor]:
    """The mean over the ranks of each of ``tensors``: one all-reduce of them flattened into one buffer (new
    tensors; the inputs are left as they are). Without a strategy or with one rank, ``tensors`` themselves."""
    world = 1 if strategy is None else strategy.world_size
    if world == 1 or any(is_sharded(t) for t in tensors):
        # FSDP2's gradients are shards of the mean over the ranks already (its reduce-scatter averages)
        return list(tensors)
    return _shaped_like(strategy.reduce(_flat(tensors), reduce_op="sum") / world, tensors)


def _flat(tensors: list[Tensor]) -> Tensor:
    """``tensors`` in one 1-D buffer, for one collective instead of one per tensor."""
    return torch.cat([t.reshape(-1) for t in tensors])


def _shaped_like(flat: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """:func:`_flat`'s buffer cut back into views shaped like ``tensors``."""
    return [f.view_as(t) for f, t in zip(torch.split(flat, [t.numel() for t in tensors]), tensors, strict=True)]


#: What torch says when `autograd.grad` meets a reentrant activation checkpoint (torch.utils.checkpoint).
_REENTRANT_CHECKPOINT = "use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()"


class SkipBatch(Exception):
    """``training_step`` returned None (Lightning's way to skip a batch): the chain stops and returns None."""


def run_chain(module: nn.Module, step_fn: Callable[..., Any], members: list[ChainMember], args: tuple,
              kwargs: dict, global_step: int, strategy: Strategy | None = None,
              values: StepValues | None = None, lightning_backward: bool = False) -> Any:
    """Run ``step_fn`` with every member's term added; returns the output with "loss" = the objective.

    A pass of ``training_step`` that returns None skips the batch, as in Lightning: no term, no further
    pass, no log, and None is returned.
    """
    members = sorted(members, key=lambda m: m.order)
    caller = caller_name(members)
    if not args and "batch" not in kwargs:
        raise TypeError("`training_step` was called without a batch.")
    if not args:
        kwargs = dict(kwargs)
        args = (kwargs.pop("batch"),)
    ctx = StepContext(module, step_fn, args, kwargs, global_step, caller, strategy, values, lightning_backward)
    ctx.members = members

    def build(i: int) -> Callable[[Any], Objective]:
        if i == len(members):
            return ctx.primary
        member, inner = members[i], build(i + 1)

        def run(batch: Any) -> Objective:
            with span(member):  # what the member does around the inner ones is its cost (CostMonitor)
                return member.apply(ctx, batch, inner)

        return run

    mark = None if values is None else (len(values.losses), len(values.values))
    try:
        with sharded(ctx.sharding):
            for member in members:  # what "auto" stands for, decided before the chain runs (a member's `prepare`)
                prepare = getattr(member, "prepare", None)
                if prepare is not None:
                    with span(member):
                        prepare(ctx, args[0])
            objective = build(0)(args[0])
    except RuntimeError as err:
        if _REENTRANT_CHECKPOINT not in str(err):
            raise
        raise RuntimeError(
            f"{caller} takes gradients with `torch.autograd.grad`, which a reentrant activation checkpoint refuses. "
            f"Checkpoint with use_reentrant=False: `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`, or "
            f"for a Hugging Face model `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            f"{{'use_reentrant': False}})` (recent transformers releases default to it). "
            f"(torch: {str(err).splitlines()[0]})"
        ) from err
    except SkipBatch:
        if values is not None:  # nothing of a skipped batch is checked: it never reaches a backward
            del values.losses[mark[0]:], values.values[mark[1]:]
            values.pending = bool(values.losses or values.values)
        return None
    if values is not None:
        values.batches.append(args[0])
    return objective.finalize()


