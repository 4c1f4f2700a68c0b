"""Where an input-space callback perturbs and differentiates: the batch input, or any layer's output.

``target=None`` is the batch tensor that ``input_key`` selects; a dotted submodule path of the
LightningModule or an ``nn.Module`` is that layer's output (:mod:`lightning_gp.functional.layer_output`).
Either way the callbacks work with an additive δ: ``x + δ`` replaces the input in the batch, or δ is added
to the layer's output by a forward hook that exists only during the pass. So nothing upstream is detached:
an input with a ``grad_fn`` keeps it, and the layers before a target (the embedding table) keep training.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import Tensor, nn

from lightning_gp.functional.layer_output import expand_mask, perturbed_output
from lightning_gp.step._batch import InputKey, replace_input, resolve_input

#: What a target may be: None (the batch input), a dotted submodule path, or a module.
Target = str | nn.Module | None
#: The mask key used when a dict batch has it and ``mask_key`` is not given.
DEFAULT_MASK_KEY = "attention_mask"

T = TypeVar("T")
Delta = Tensor | Callable[[Tensor], Tensor] | None


def resolve_target(root: nn.Module, target: Target, owner: str) -> nn.Module | None:
    """The target module inside ``root``, or None for the batch input.

    Raises:
        ValueError: a path that does not resolve (listing the nearest module names), or a module that
            is not part of ``root``.
    """
    if target is None:
        return None
    if isinstance(target, nn.Module):
        if not any(m is target for m in root.modules()):
            raise ValueError(f"{owner}: `target` ({type(target).__name__}) is not a submodule of "
                             f"`{type(root).__name__}`. Pass one of its own modules or a dotted path.")
        return target
    if not isinstance(target, str):
        raise TypeError(f"{owner}: `target` must be None, a dotted module path or an nn.Module, got "
                        f"{type(target).__name__}.")
    try:
        return root.get_submodule(target)
    except AttributeError:
        names = [n for n, _ in root.named_modules() if n]
        near = difflib.get_close_matches(target, names, n=5, cutoff=0.3) or names[:5]
        raise ValueError(
            f"{owner}: `target={target!r}` is not a submodule of `{type(root).__name__}`. Nearest module "
            f"names: {near}."
        ) from None


def check_samples(x: Tensor, owner: str) -> None:
    """An empty batch has no per-sample term to add: say so (its mean loss is NaN, which would be blamed on the
    penalty's weight)."""
    if x.shape[0] == 0:
        raise ValueError(
            f"{owner}: the batch is empty (0 samples), so there is no per-sample term to add, and its mean loss is "
            f"NaN. Keep empty batches out of training (a sampler that yields none, or `drop_last=True`)."
        )


def not_run_error(owner: str, module: nn.Module, sharing: list[str] | None, where: str,
                  purpose: str = "to differentiate") -> RuntimeError:
    """A target that never ran in ``where``, naming the modules that share its weight (T5's ``shared``, whose
    weight ``encoder.embed_tokens`` and ``decoder.embed_tokens`` use): the user meant one of those."""
    return RuntimeError(
        f"{owner}: the target `{type(module).__name__}` did not run in `{where}`, so there is no output {purpose}. "
        f"Pass a `target` the model calls on the batch"
        + (f"; these modules share its weight: {', '.join(f'`{n}`' for n in sharing)}." if sharing else ".")
    )


def embedding_names(root: nn.Module) -> list[str]:
    return [n for n, m in root.named_modules() if isinstance(m, nn.Embedding)]


@dataclass
class Probe:
    """One step's view of the site: the batch, the resolved input path or target, and the mask."""

    batch: Any
    module: nn.Module | None
    path: tuple | None
    x: Tensor | None
    mask: Tensor | None
    owner: str
    base: Tensor | None = None  # the unperturbed input or target output of the latest pass
    names: list[str] | None = None  # the target's names in the model (for messages)
    sharing: list[str] | None = None  # other modules holding the target's parameters (tied weights)

    @contextlib.contextmanager
    def applied(self, delta: Delta, chain: bool = False) -> Iterator[tuple[Any, Callable[[], Tensor | None]]]:
        """The batch to run with δ applied, and a function giving the δ actually used (after the pass).

        ``chain``: the block runs the rest of the callback chain, whose members may make passes of their own
        (a finite difference, VAT, a reduction check); on a layer they all see the same δ, as they all see the
        perturbed batch on a batch input. Otherwise the block is one pass and the target must run once.
        """
        if self.module is None:
            self.base = self.x
            d = delta(self.x) if callable(delta) else delta
            if d is None:
                d = self.x.detach().new_zeros(self.x.shape).requires_grad_(True)
            d_eff = d if self.mask is None else d * expand_mask(self.mask, self.x, "mask")
            yield replace_input(self.batch, self.path, self.x + d_eff.to(self.x.dtype)), (lambda: d)
        else:
            with perturbed_output(self.module, delta, mask=self.mask, owner=self.owner, reuse=chain,
                                  names=self.names) as record:
                yield self.batch, (lambda: record.delta)
            if record.calls == 0:
                raise not_run_error(self.owner, self.module, self.sharing, "training_step", "to perturb")
            self.base = record.output
            check_samples(self.base, self.owner)

    def masked(self, t: Tensor) -> Tensor:
        """``t`` (input- or output-shaped) with the padded positions zeroed."""
        return t if self.mask is None else t * expand_mask(self.mask, t, "mask")

    def run(self, fn: Callable[[Any], T], delta: Delta = None, chain: bool = False) -> tuple[T, Tensor]:
        """``fn(batch)`` with δ applied (None: a zero leaf that requires grad); returns its result and δ.

        ``chain=True`` when ``fn`` is the rest of the callback chain (see :meth:`applied`)."""
        with self.applied(delta, chain) as (batch, used):
            out = fn(batch)
        return out, used()


@dataclass
class Site:
    """A callback's ``target``/``input_key``/``mask_key``, resolved against the module once."""

    target: Target
    input_key: InputKey
    mask_key: str | None
    owner: str
    module: nn.Module | None = None
    resolved: bool = False
    names: list[str] = field(default_factory=list)  # the target's names in the model
    sharing: list[str] = field(default_factory=list)  # other modules holding its parameters (tied weights)

    def resolve(self, root: nn.Module) -> None:
        self.module = resolve_target(root, self.target, self.owner)
        self.names.clear()
        self.sharing.clear()
        if self.module is not None:
            own = {id(p) for p in self.module.parameters(recurse=False)}
            for n, m in root.named_modules(remove_duplicate=False):
                if m is self.module:
                    self.names.append(n)
                elif own and any(id(p) in own for p in m.parameters(recurse=False)):
                    self.sharing.append(n)
        self.resolved = True

    def input_gradient(self, grad: Tensor | None) -> Tensor:
        """``grad``, the loss's gradient at the site, or the error saying the loss does not depend on it (None: no
        autograd path)."""
        if grad is None:
            raise ValueError(
                f"{self.owner}: the loss returned by `training_step` does not depend on "
                + (f"the output of `target={self.target!r}`" if self.target is not None
                   else f"the input selected by `input_key={self.input_key!r}`")
                + " (no autograd path). Make sure the model is applied to this batch element, not to a detached "
                "copy or another entry of the batch."
            )
        return grad

    def probe(self, root: nn.Module, batch: Any) -> Probe:
        if not self.resolved:
            self.resolve(root)
        mask = self.mask(batch)
        if self.module is not None:
            return Probe(batch, self.module, None, None, mask, self.owner, names=self.names, sharing=self.sharing)
        x, path = resolve_input(batch, self.input_key, self.owner)
        if not x.is_floating_point():
            found = embedding_names(root)
            raise TypeError(
                f"{self.owner}: the input selected by `input_key={self.input_key!r}` has dtype {x.dtype} (token "
                f"ids?), which cannot be perturbed or differentiated. Pass `target=` the layer whose output to "
                f"use instead, e.g. the embedding layer"
                + (f"; nn.Embedding modules in the model: {found}." if found else ".")
            )
        if x.ndim == 0:
            raise ValueError(f"{self.owner}: the input selected by `input_key={self.input_key!r}` has no batch "
                             f"dimension.")
        check_samples(x, self.owner)
        return Probe(batch, None, path, x, mask, self.owner, base=x)

    def mask(self, batch: Any) -> Tensor | None:
        """The batch's (B, T) mask of real positions, or None."""
        if self.mask_key is None:
            key = DEFAULT_MASK_KEY if isinstance(batch, Mapping) and DEFAULT_MASK_KEY in batch else None
        else:
            key = self.mask_key
        if key is None:
            return None
        if not isinstance(batch, Mapping) or key not in batch:
            raise ValueError(f"{self.owner}: `mask_key={key!r}` is not a key of the batch.")
        mask = batch[key]
        if not isinstance(mask, Tensor) or mask.ndim != 2:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"{self.owner}: the mask `batch[{key!r}]` must be a (B, T) tensor of real positions, "
                             f"got {shape}.")
        return mask


def site_key_fields(input_key: InputKey, target: Target) -> dict[str, Any]:
    """The ``state_key`` fields of an input-space callback: what it perturbs, nothing it tunes."""
    fields = {}
    if input_key is not None:
        fields["input_key"] = repr(input_key)
    if target is not None:
        fields["target"] = target if isinstance(target, str) else type(target).__name__
    return fields


class SiteCallback:
    """Mixin of the callbacks that work at a :class:`Site` (``self.site``, with ``input_key`` and ``target``
    attributes): the checkpoint key from what they perturb, and the target resolved in ``setup``."""

    site: Site
    input_key: InputKey
    target: Target

    def state_key_fields(self) -> dict[str, Any]:
        return site_key_fields(self.input_key, self.target)

    def setup(self, trainer: Any, pl_module: nn.Module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # type: ignore[misc]
        self.site.resolve(pl_module)
