"""Autograd building blocks of the finite-difference penalties: the linear surrogate and the quotient.

Both let a gradient that was computed by hand enter an *ordinary* backward pass (so DDP's hooks reduce
it like any other gradient) instead of being written into ``.grad``:

- :func:`linearised` is a tensor with a loss's value whose gradient w.r.t. each leaf is a given, detached
  gradient (Σ⟨v, g_v⟩ plus a constant), without a second backward through the loss's graph;
- :func:`finite_difference_term` is the difference quotient (value 0) whose gradient is
  scale·(∇perturbed − ∇base)/h.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from lightning_gp.functional._sharded import active_sharding, local
from lightning_gp.functional._torch_private import foreach_add, foreach_add_, foreach_copy_, foreach_mul


def autograd_leaves(t: Tensor) -> list[Tensor]:
    """Every tensor a backward from ``t`` deposits a gradient into (its graph's ``AccumulateGrad`` nodes)."""
    if t.grad_fn is None:
        return [t] if t.requires_grad else []
    leaves, seen, stack = [], set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.append(variable)
        else:
            stack.extend(nxt for nxt, _ in fn.next_functions if nxt is not None)
    return leaves


class Linearised(torch.autograd.Function):
    """The loss's value, with gradient ``g_v`` w.r.t. each leaf v: Σ⟨v, g_v⟩ plus a constant, without its cost.

    Written as a Function rather than ``Σ (v * g).sum()``: no elementwise product in the forward, and the
    backward hands each leaf ``g_v · upstream`` (one scalar multiply, as a hand-written ``g0 + w·g1``), in g's
    own precision whatever autocast is active.
    """

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: tuple[Tensor, ...], *leaves: Tensor) -> Tensor:
        ctx.grads = grads
        return value.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        # one fused launch where the gradients allow (not a list mixing FSDP2 DTensor shards and plain tensors)
        if len({(g.dtype, g.device, type(g)) for g in grads}) == 1 and not any(g.is_sparse for g in grads):
            return (None, None, *foreach_mul(list(grads), upstream.to(grads[0].dtype)))
        return (None, None, *(g * upstream.to(g.dtype) for g in grads))


def linearised(loss: Tensor, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
    """A tensor with ``loss``'s value whose gradient w.r.t. each leaf v of ``pairs`` (v, g) is g (detached).

    Its backward reaches the leaves directly, not through the loss's graph.
    """
    if not pairs:
        return loss.detach()
    leaves = tuple(v for v, _ in pairs)
    return Linearised.apply(loss.detach(), tuple(g.detach() for _, g in pairs), *leaves)


def leaf_gradients(loss: Tensor, *, retain: bool = False) -> list[tuple[Tensor, Tensor]]:
    """(leaf, ∇ leaf) for every autograd leaf ``loss`` depends on, by one backward (leaves it does not reach are left
    out). Under FSDP2 (an active :class:`~lightning_gp.functional._sharded.Sharding`) the parameters' entries are the
    shards with FSDP2's reduce-scattered gradients (the mean over ranks), taken by a real backward.
    """
    leaves = autograd_leaves(loss)
    if not leaves:
        return []
    sharding = active_sharding()
    if sharding is not None:
        return sharding.backward_pairs(loss, leaves, retain)
    grads = torch.autograd.grad(loss, leaves, retain_graph=retain, allow_unused=True)
    return [(v, g) for v, g in zip(leaves, grads, strict=True) if g is not None]


def linearised_now(loss: Tensor) -> Tensor:
    """:func:`linearised` with ``loss``'s gradients taken now, w.r.t. every leaf of its graph (which is freed).

    For a finite difference's second pass: its backward runs at once, unscaled, so it is free of a GradScaler's
    scale (fp16 gradients of the pass scaled by 65536·(2/h) overflowed) and of parameters put back after it.
    """
    return linearised(loss, leaf_gradients(loss))


def finite_difference_term(perturbed: Tensor, base: Tensor, *, step: float, scale: float = 1.0) -> Tensor:
    """The difference quotient as a term of value 0 whose gradient is ``scale · (∇perturbed − ∇base) / step``.

    ``perturbed`` is the loss at the displaced point (x + h·d or θ + h·g), ``base`` the loss at the point
    itself, usually :func:`linearised` (its gradient without a second pass through its graph). Adding the
    term to an objective adds ≈ ∇ of the penalty to the objective's gradient and leaves its value alone.

    Example:


        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> term = finite_difference_term((w + 1e-3).square().sum(), w.square().sum(), step=1e-3)
        >>> (grad,) = torch.autograd.grad(term, w)  # (∇‖w + h‖² − ∇‖w‖²) / h = 2
        >>> float(term.detach()), torch.allclose(grad, torch.full((2,), 2.0), rtol=1e-3)
        (0.0, True)
    """
    diff = (perturbed - base) * (scale / step)
    return diff - diff.detach()


#: What torch says when a graph has no double backward: torch.compile's aot_autograd, fused kernels such as
#: ``aten::_scaled_dot_product_flash_attention_for_cpu_backward`` (SDPA, the default attention of most Hugging
#: Face model classes), custom autograd Functions whose backward is not differentiable.
_NO_DOUBLE_BACKWARD = re.compile(r"double backward|donated buffer|derivative for .+ is not implemented")


#: How the package takes the gradient of a gradient (a penalty's, a Hessian-vector product's): "auto" is the double
#: backward where the model has one and finite differences where it has none, decided once (:func:`agreed_method`).
Method = Literal["auto", "double_backward", "finite_difference"]
METHODS: tuple[str, ...] = get_args(Method)
#: A method without "auto": what the functional penalties and the GAN regularizers take, and what "auto" resolves to.
ExplicitMethod = Literal["double_backward", "finite_difference"]
EXPLICIT_METHODS: tuple[str, ...] = get_args(ExplicitMethod)


def agreed_method(works: bool | None, any_rank: Callable[[Tensor], Tensor] | None = None,
                  device: torch.device | None = None) -> tuple[ExplicitMethod, bool]:
    """What ``method="auto"`` takes given whether this rank's double backward ``works`` (None: nothing to try it on),
    and whether that is settled: finite differences on every rank as soon as one rank has no double backward.

    ``any_rank`` is the max over the ranks (a collective every rank calls; None on one process).

    Example:


        >>> agreed_method(True), agreed_method(False), agreed_method(None)
        (('double_backward', True), ('finite_difference', True), ('double_backward', False))
    """
    failed = torch.tensor([0.0 if works is not False else 1.0], device=device)
    if any_rank is not None:
        failed = any_rank(failed)
    if float(failed) > 0:
        return "finite_difference", True
    return "double_backward", works is True


class NoDoubleBackwardError(RuntimeError):
    """The model has no double backward (torch's message appended); ``method="finite_difference"`` has none."""


def no_double_backward_error(err: RuntimeError) -> NoDoubleBackwardError | None:
    """A clear error for torch's "no double backward" (torch.compile's aot_autograd, fused kernels), or None."""
    if isinstance(err, NoDoubleBackwardError):
        return err
    if not _NO_DOUBLE_BACKWARD.search(str(err)):
        return None
    return NoDoubleBackwardError(
        "This penalty differentiates a gradient (a double backward), which this model does not support: "
        "torch.compile'd modules and fused attention kernels (SDPA) have none. Use method='finite_difference' "
        f"(or 'auto'), which needs two ordinary passes instead. (torch: {str(err).splitlines()[0]})"
    )


def supports_double_backward(value: Tensor, inputs: Sequence[Tensor]) -> bool | None:
    """Whether ``value`` (built from gradients taken with ``create_graph=True``) can be differentiated w.r.t.
    ``inputs``: runs that backward once, its result thrown away. None when ``value`` has no graph to try.

    Raises:
        RuntimeError: any error other than a missing double backward.
    """
    inputs = [t for t in inputs if t.requires_grad]
    if not value.requires_grad or not inputs:
        return None
    try:
        torch.autograd.grad(value, inputs, retain_graph=True, allow_unused=True)
    except RuntimeError as err:
        if no_double_backward_error(err) is None:
            raise
        return False
    return True


def sole_owners(params: Sequence[Tensor], module: nn.Module) -> bool:
    """Whether each of ``params`` is a plain dense tensor that fills its storage alone: no other parameter or buffer of
    ``module`` shares it (tied weights are one tensor; an alias made through ``.data`` or a view is another), and it is
    no view into a larger buffer (cuDNN's flattened RNN weights, a flat-parameter optimizer). Then its storage can be
    swapped for another without anything else of the module seeing the old one."""
    users: dict[int, int] = {}
    for t in {id(t): t for t in (*module.parameters(), *module.buffers())}.values():
        if t.layout != torch.strided:  # a sparse buffer (a graph's adjacency) has no dense storage to share
            continue
        if type(t.data) is not Tensor:  # a tensor subclass may not say which storage it reads: keep in place
            return False
        ptr = t.untyped_storage().data_ptr()
        users[ptr] = users.get(ptr, 0) + 1
    for p in params:
        data = p.data
        if type(data) is not Tensor or data.layout != torch.strided or data.storage_offset() != 0:
            return False
        storage = data.untyped_storage()
        if storage.nbytes() != data.numel() * data.element_size() or users.get(storage.data_ptr()) != 1:
            return False
    return True


class Displacement:
    """θ ← θ + α·d from construction until :meth:`restore`, which puts each parameter back bit for bit.

    :func:`displaced` as an object, for a displacement that must outlive a block: SAM's perturbed pass, whose graph
    saved θ + α·d and is differentiated by Lightning's backward after ``training_step`` returned.

    In place by default (θ saved in a copy, written back). With ``owner`` (the module whose parameters and buffers
    are every tensor the pass reads), where :func:`sole_owners` holds for it, θ + α·d is computed into new storage
    that the parameters take for the displacement, and
    :meth:`restore` hands them their own storage back: one fused add instead of a copy, an add and a copy back. Only
    for a displacement whose graph is differentiated before :meth:`restore` (a graph that saved a view of a
    parameter keeps the storage it saw).
    """

    def __init__(self, params: Sequence[Tensor], directions: Sequence[Tensor], alpha: float, *,
                 owner: nn.Module | None = None, withdrawable: bool = False) -> None:
        self.sharding = active_sharding()
        self.params = list(params)
        # d kept for `withdraw` only where asked (SAM lets d go once θ has moved)
        self.directions, self.alpha = (list(directions) if withdrawable else None), alpha
        self.swapped = owner is not None and self.sharding is None and sole_owners(self.params, owner)
        if self.swapped:
            with torch.no_grad():
                moved = foreach_add([p.data for p in self.params],
                                    [d.to(p.dtype) for p, d in zip(self.params, directions, strict=True)], alpha)
            # same layout as θ (a channels-last weight stays channels-last), else in place as below
            self.swapped = all(m.stride() == p.stride() for m, p in zip(moved, self.params, strict=True))
        if self.swapped:
            self.saved: list[Tensor] | None = [p.data for p in self.params]
            for p, m in zip(self.params, moved, strict=True):
                p.data = m
            self._forget_copies()
            return
        self.datas = [local(p.data) for p in self.params]  # a sharded parameter moves in its own shard
        # a withdrawable displacement is taken back by subtraction: no copy of θ
        self.saved = [] if withdrawable else [d.clone() for d in self.datas]
        try:
            with torch.no_grad():
                foreach_add_(self.datas, [local(d).to(p.dtype) for p, d in zip(params, directions, strict=True)],
                             alpha)
            self._forget_copies()  # the next forward all-gathers the moved shards
        except BaseException:
            self.restore()
            raise

    def withdraw(self) -> None:
        """Subtract α·d from the parameters as they are now (in place): AWP's order, where the optimizer stepped at
        θ + α·d in between, so θ' − α·d is wanted, not θ. The copy of θ is let go. A no-op once done."""
        if self.saved is None:
            return
        if self.swapped or self.directions is None:
            raise RuntimeError("Displacement.withdraw needs `withdrawable=True` and no `owner` (a move in place).")
        with torch.no_grad():
            moved = [local(p.data) for p in self.params]
            foreach_add_(moved, [local(d).to(p.dtype) for p, d in zip(self.params, self.directions, strict=True)],
                         -self.alpha)
        self.saved = None
        self._forget_copies()

    def restore(self) -> None:
        """θ put back bit for bit (its own storage, or from the copy, not by subtraction); a no-op once done. A
        withdrawable displacement is withdrawn (:meth:`withdraw`)."""
        if self.saved is None:
            return
        if self.directions is not None:
            self.withdraw()
            return
        if self.swapped:
            for p, s in zip(self.params, self.saved, strict=True):
                p.data = s
        else:
            with torch.no_grad():
                foreach_copy_(self.datas, self.saved)
        self.saved = None
        self._forget_copies()  # no full copy of θ + α·d is left for the next pass to reuse

    def _forget_copies(self) -> None:
        if self.sharding is not None:
            self.sharding.reshard()
        # autocast caches each parameter's low-precision copy for the region: without this the displaced pass
        # would reuse θ's copy (a zero difference under bf16-mixed), and the passes after it θ + α·d's
        torch.clear_autocast_cache()


@contextlib.contextmanager
def displaced(params: Sequence[Tensor], directions: Sequence[Tensor], alpha: float) -> Iterator[None]:
    """θ ← θ + α·d in place for the block, each parameter put back bit for bit after it.

    In place on the tensors the model and the optimizer hold, so ties, aliases, ``requires_grad`` and sharded
    parameters stay what they are (``torch.func.functional_call`` swaps attributes by name, and on a module
    registered under several names it can leave a plain tensor behind). Through ``.data``: the version
    counters do not move, so graphs built before the block (the clean pass's) can still run backward after
    it. A graph built *inside* the block saw θ + α·d; take its gradients inside the block too.

    Example:


        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> with displaced([w], [torch.ones(2)], 0.5):
        ...     inside = w.detach().clone()
        >>> inside.tolist(), w.tolist()
        ([1.5, 2.5], [1.0, 2.0])
    """
    displacement = Displacement(params, directions, alpha)
    try:
        yield
    finally:
        displacement.restore()


@contextlib.contextmanager
def explained_double_backward() -> Iterator[None]:
    """Re-raise torch's "no double backward" errors of the block as :func:`no_double_backward_error`."""
    try:
        yield
    except RuntimeError as err:
        clear = no_double_backward_error(err)
        if clear is None:
            raise
        raise clear from err


def grad(outputs: Any, inputs: Any, *, create_graph: bool = False, retain_graph: bool | None = None,
         allow_unused: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad``; where a double backward (``create_graph``) is not supported, a clear error.

    Raises:
        RuntimeError: naming ``method="finite_difference"`` when the model has no double backward (a
            ``torch.compile``d module, a fused attention kernel), with torch's own message appended.
    """
    with explained_double_backward() if create_graph else contextlib.nullcontext():
        return torch.autograd.grad(outputs, inputs, create_graph=create_graph, retain_graph=retain_graph,
                                   allow_unused=allow_unused)
