"""Sharded parameters (FSDP2's ``fully_shard``): the shards a step perturbs, and the gradients that reach them.

Under FSDP2 a module's registered parameters are DTensor shards between steps; its forward all-gathers them into
plain unsharded parameters, and its backward reduce-scatters their gradients (the mean over the data-parallel
ranks) into the shards' ``.grad``. Two consequences for a step that takes gradients itself:

- ``torch.autograd.grad`` w.r.t. the unsharded parameters gives each rank's own unreduced full gradient, and a
  linearisation over them deposits gradients FSDP2 never reduce-scatters. So while a :class:`Sharding` is active,
  the leaves' gradients come from a real backward (:meth:`Sharding.backward_pairs`), whose parameter gradients are
  the shards' (the mean over ranks), and a linearisation is over the shards.
- A parameter displaced in place is displaced in its shard; the next forward must all-gather again
  (:meth:`Sharding.reshard`), or it would reuse the unsharded copy it kept (FSDP2 keeps the root's).

DTensor arithmetic does the rest: a norm over shards is a DTensor reduced over the ranks on read.
Design notes: ``docs/scaling.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import Tensor, nn

try:  # torch built without distributed support has neither
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover
    FSDPModule = DTensor = None  # type: ignore[assignment,misc]


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    """The submodules of ``module`` (itself included) that FSDP2's ``fully_shard`` manages."""
    if FSDPModule is None or not torch.distributed.is_initialized():  # FSDP2 needs a process group
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def layer_type(module: nn.Module) -> type:
    """The class whose ``forward`` ``module`` runs: FSDP2's ``fully_shard`` makes a module an instance of a new class
    (``FSDPLinear`` for a Linear) that adds hooks, not a forward; its original class is the next one in the MRO."""
    kind = type(module)
    if FSDPModule is not None and issubclass(kind, FSDPModule):
        return next(c for c in kind.__mro__[1:] if not issubclass(c, FSDPModule))
    return kind


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (a shard of a parameter or of its gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The rank's own part of ``t``: the local shard of a DTensor (same storage), ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def whole(t: Tensor) -> Tensor:
    """``t`` as one plain tensor: a DTensor's full value (a norm over shards, replicated: no communication)."""
    return t.full_tensor() if is_sharded(t) else t


class Sharding:
    """The FSDP2 modules of one training step and the trainable shards they hold (taken while resharded)."""

    def __init__(self, modules: Sequence[nn.Module], root: nn.Module) -> None:
        self.modules = list(modules)
        self.reshard()  # between steps the shards are registered; after a forward the root's full copy may be
        self.params = [p for p in root.parameters() if p.requires_grad]

    def reshard(self) -> None:
        """Free the all-gathered copies, so the next forward or backward all-gathers the shards as they are now."""
        for m in self.modules:
            m.reshard()

    def backward_pairs(self, loss: Tensor, leaves: Sequence[Tensor], retain: bool) -> list[tuple[Tensor, Tensor]]:
        """(tensor, ∇ tensor) for each trainable shard and each non-parameter leaf of ``loss``, by one backward.

        The shards' gradients are FSDP2's reduce-scatter: the mean over the data-parallel ranks. ``.grad`` of every
        tensor involved is put back as it was (an accumulated micro-batch's gradient is kept).
        """
        # The unsharded parameters a forward uses are nn.Parameters; their gradients reach the shards.
        others = [v for v in leaves if not isinstance(v, nn.Parameter)]
        targets = [*self.params, *others]
        kept = [t.grad for t in targets]
        for t in targets:
            t.grad = None
        try:
            torch.autograd.backward(loss, retain_graph=retain)
            return [(t, t.grad) for t in targets if t.grad is not None]
        finally:
            for t, g in zip(targets, kept, strict=True):
                t.grad = g


_ACTIVE: ContextVar[Sharding | None] = ContextVar("lightning_gp_sharding", default=None)


def active_sharding() -> Sharding | None:
    """The :class:`Sharding` of the step being run, or None (no FSDP2 module)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def sharded(sharding: Sharding | None) -> Iterator[None]:
    """Make ``sharding`` the active one for the block (None: leave things as they are)."""
    if sharding is None:
        yield
        return
    token = _ACTIVE.set(sharding)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
