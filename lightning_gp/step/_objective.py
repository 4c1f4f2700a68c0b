"""The objective a training step backpropagates: the loss, the terms the callbacks add, and their algebra.

A finite-difference callback takes ∇L once and replaces the loss by its linearisation (same value, same
gradient, no second trip through the loss's graph); :class:`Objective` keeps track of which tensor currently
stands for the loss. Design notes: ``docs/design/interception.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from torch import Tensor

from lightning_gp.functional._autograd import leaf_gradients, linearised

#: How ``training_step`` reduced the per-sample losses to its scalar loss.
Reduction = Literal["mean", "sum"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


@dataclass
class Objective:
    """What a training step produced: the raw loss, the terms the callbacks added, the user's output.

    The objective to backpropagate is :attr:`total` = :attr:`loss_in_objective` + :attr:`terms`.
    :attr:`loss_in_objective` is the loss itself until a finite-difference callback takes ∇L w.r.t. every
    autograd leaf of the loss (:meth:`loss_grads`); from then on it is :attr:`linearised_loss`
    (:func:`~lightning_gp.functional._autograd.linearised`: Σ⟨v, ∇ᵥL⟩ with detached gradients, plus a
    constant): the same value and the same gradient, without a second backward through the loss's graph.
    """

    loss: Tensor
    output: Any
    terms: Tensor | None = None
    linearised_loss: Tensor | None = None
    grads: dict[int, tuple[Tensor, Tensor]] | None = None  # id(leaf) → (leaf, ∇_leaf L), see loss_grads

    @property
    def loss_in_objective(self) -> Tensor:
        """A tensor with the loss's value and the loss's gradient (the loss itself until it is linearised)."""
        return self.loss if self.linearised_loss is None else self.linearised_loss

    @property
    def total(self) -> Tensor:
        """What the final backward differentiates: the loss (or its linearisation) plus every added term."""
        return self.loss_in_objective if self.terms is None else self.loss_in_objective + self.terms

    def add(self, term: Tensor) -> Objective:
        """This step with ``term`` added to the objective."""
        terms = term if self.terms is None else self.terms + term
        return Objective(loss=self.loss, output=self.output, terms=terms, linearised_loss=self.linearised_loss,
                    grads=self.grads)

    def loss_grads(self, retain: bool = True, private: tuple[Tensor, ...] = ()) -> Objective:
        """This step with ∇L w.r.t. every autograd leaf of the loss, and the loss linearised (see above).

        One backward through the loss's graph (``retain``: whether an outer callback still differentiates the
        loss; a compiled backward with donated buffers allows no ``retain_graph``), for all
        leaves at once — the parameters, the input leaf of a data penalty, any other tensor the loss depends
        on — so the final backward deposits exactly the gradients the loss's own graph would have, into the
        same tensors (parameters the loss does not use stay without a gradient, as before). A no-op when a
        callback already did it. ``private`` leaves (a callback's own zero leaf δ, whose gradient it takes with
        :meth:`take_grad` and no one reads after) stay out of the linearised loss, so their gradient is neither held
        until the final backward nor deposited by it.
        """
        if self.grads is not None:
            return self
        pairs = {id(v): (v, g) for v, g in leaf_gradients(self.loss, retain=retain)}
        skip = {id(t) for t in private}
        return Objective(loss=self.loss, output=self.output, terms=self.terms,
                         linearised_loss=linearised(self.loss, [p for k, p in pairs.items() if k not in skip]),
                         grads=pairs)

    def take_grad(self, tensor: Tensor) -> Tensor | None:
        """:meth:`grad_of`, and the gradient let go of here (a ``private`` leaf's: its reader is its only holder)."""
        assert self.grads is not None
        pair = self.grads.pop(id(tensor), None)
        return None if pair is None else pair[1]

    def grad_of(self, tensor: Tensor) -> Tensor | None:
        """∇L w.r.t. ``tensor`` (after :meth:`loss_grads`); None when the loss does not depend on it."""
        assert self.grads is not None
        pair = self.grads.get(id(tensor))
        return None if pair is None else pair[1]

    def finalize(self) -> Any:
        """The user's output with its loss replaced by :attr:`total`."""
        if isinstance(self.output, Mapping):
            out = dict(self.output)
            out["loss"] = self.total
            return out
        return self.total


def caller_name(members: Iterable[object]) -> str:
    """How messages name the callbacks running a step: their class names in order, each once, joined by "and"
    ("lightning_gp" for none).

    Example:


        >>> class A: pass
        >>> class B: pass
        >>> caller_name([A(), B(), A()]), caller_name([])
        ('A and B', 'lightning_gp')
    """
    names = dict.fromkeys(type(m).__name__ for m in members)
    return " and ".join(names) or "lightning_gp"


def extract_loss(output: Any, caller: str) -> Tensor:
    """The scalar loss in a ``training_step`` output (a tensor or a mapping with "loss"), or a clear error that
    names ``caller`` (:func:`caller_name`)."""
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if loss is None:
        raise ValueError(
            f"`training_step` returned {'a dict without a loss' if isinstance(output, Mapping) else 'None'}, "
            f"but {caller} must add a penalty to the loss. Return the loss tensor (or a dict with key "
            f"'loss'); to skip a batch, remove the callback or return a zero loss."
        )
    if not isinstance(loss, Tensor):
        raise TypeError(f"`training_step` returned a loss of type {type(loss).__name__}; {caller} needs a tensor.")
    if loss.numel() != 1:
        raise ValueError(
            f"`training_step` returned a loss of shape {tuple(loss.shape)}; {caller} needs a scalar "
            f"(the batch mean, e.g. `F.cross_entropy(logits, y)`)."
        )
    return loss.reshape(())


