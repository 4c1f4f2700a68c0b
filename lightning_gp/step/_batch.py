"""Finding the input tensor in a batch (``input_key``) and putting a replacement back.

A batch is a tensor, a tuple/list/namedtuple, a mapping or a dataclass, possibly nested. The input is
located by a *path* of indices/keys, so the callbacks can rebuild the batch with another tensor at that
place (a leaf that requires grad, an adversarial example) without mutating the user's batch in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch  # noqa: F401  (the docstring example)
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

InputKey = int | str | Callable[[Any], Tensor] | None

#: Dict keys tried, in order, when ``input_key`` is None and the batch is a mapping.
DEFAULT_KEYS = ("x", "input", "inputs")


def describe(batch: Any, depth: int = 0) -> str:
    """A short structural description of a batch, for error messages: ``(Tensor[8, 4], Tensor[8])``."""
    if isinstance(batch, Tensor):
        return f"Tensor{list(batch.shape)}" + ("" if batch.is_floating_point() else f"({batch.dtype})")
    if depth > 3:
        return "..."
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        inner = ", ".join(describe(v, depth + 1) for v in batch)
        return f"[{inner}]" if isinstance(batch, list) else f"({inner})"
    if dataclasses.is_dataclass(batch):
        fields = ", ".join(f"{f.name}={describe(getattr(batch, f.name), depth + 1)}" for f in dataclasses.fields(batch))
        return f"{type(batch).__name__}({fields})"
    return type(batch).__name__


def _children(node: Any):
    if isinstance(node, Mapping):
        return list(node.items())
    if isinstance(node, (tuple, list)):
        return list(enumerate(node))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    return []


def _find(node: Any, target: Tensor, path: tuple) -> tuple | None:
    if node is target:
        return path
    for key, child in _children(node):
        found = _find(child, target, (*path, key))
        if found is not None:
            return found
    return None


def _get(node: Any, key: Any) -> Any:
    if dataclasses.is_dataclass(node) and not isinstance(node, (Mapping, tuple, list)):
        return getattr(node, key)
    return node[key]


def value_at(batch: Any, path: tuple) -> Any:
    """The entry of ``batch`` at ``path`` (a tuple of indices, keys and dataclass field names)."""
    for key in path:
        batch = _get(batch, key)
    return batch


def resolve_input(
    batch: Any, input_key: InputKey, owner: str, *, computed: bool = False,
    default_keys: tuple[str, ...] = DEFAULT_KEYS, whole_batch: bool = False,
) -> tuple[Tensor, tuple | None]:
    """Return the input tensor and its path in ``batch`` (the one place a batch's input is found).

    Defaults (``input_key=None``): a tensor batch is the input; a tuple/list's first element; a mapping's
    first key among ``default_keys``. An ``int``/``str`` indexes the batch; a callable maps the batch to a
    tensor that must be *part of* the batch (it is found by identity, so it can be replaced). With
    ``computed`` a callable may compute a new tensor (a monitor replaces nothing): its path is None. With
    ``whole_batch``, a batch whose input the defaults cannot find is itself the input (what a module is called
    on: a LightningModule's ``forward`` may take the whole dict), path ``()``.

    Example:


        >>> x, y = torch.zeros(4, 3), torch.zeros(4)
        >>> resolve_input({"x": x, "y": y}, None, "Callback")[1], resolve_input((x, y), 1, "Callback")[1]
        (('x',), (1,))
    """
    where = f"`{owner}(input_key={input_key!r})`"
    try:
        if input_key is None:
            if isinstance(batch, Tensor):
                return batch, ()
            if isinstance(batch, (tuple, list)) and len(batch) > 0:
                path: tuple = (0,)
            elif isinstance(batch, Mapping) and any(k in batch for k in default_keys):
                path = (next(k for k in default_keys if k in batch),)
            elif whole_batch:
                return batch, ()
            elif isinstance(batch, Mapping):
                raise ValueError(
                    f"{where} cannot tell which entry of the batch is the input: the batch is a mapping "
                    f"with keys {list(batch)} and none of {list(default_keys)}. Batch: {describe(batch)}. "
                    f"Pass `input_key=<key>`."
                )
            else:
                raise ValueError(
                    f"{where} cannot tell which part of the batch is the input. Batch: {describe(batch)}. "
                    f"Pass `input_key` (an index, a dict key, or a callable returning the input tensor)."
                )
        elif callable(input_key):
            value = input_key(batch)
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"{where} returned {type(value).__name__}, not a tensor. Batch: {describe(batch)}."
                )
            found = _find(batch, value, ())
            if found is None and computed:
                return value, None
            if found is None:
                raise ValueError(
                    f"{where} returned a tensor that is not an element of the batch (a new tensor computed "
                    f"from it?), so it cannot be replaced by the perturbed input. Return the batch's own "
                    f"tensor, e.g. `lambda b: b['image']`. Batch: {describe(batch)}."
                )
            path = found
        else:
            path = (input_key,)
        node = value_at(batch, path)
    except (KeyError, IndexError, TypeError, AttributeError) as err:
        raise ValueError(f"{where} cannot be resolved in the batch: {err!r}. Batch: {describe(batch)}.") from None
    if not isinstance(node, Tensor):
        nested = ""
        if isinstance(batch, (list, tuple, Mapping)):  # a batch of batches: several train loaders, combined
            first = next(iter(batch.values() if isinstance(batch, Mapping) else batch), None)
            if isinstance(first, (list, tuple, Mapping)):
                nested = (" The batch holds several loaders' batches (a list or dict of train dataloaders): pass "
                          "the input's full path, e.g. `input_key=lambda batch: batch[0][0]` for the first "
                          "loader's input.")
        raise ValueError(f"{where} selects a {type(node).__name__}, not a tensor.{nested} Batch: {describe(batch)}.")
    return node, path


def replace_input(batch: Any, path: tuple, value: Tensor) -> Any:
    """A copy of ``batch`` (containers only; tensors are shared) with ``value`` at ``path``."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    child = replace_input(_get(batch, key), rest, value)
    if isinstance(batch, Mapping):
        out = dict(batch) if type(batch) is dict else type(batch)(batch)
        out[key] = child
        return out
    if isinstance(batch, list):
        out = list(batch)
        out[key] = child
        return out
    if isinstance(batch, tuple):
        items = list(batch)
        items[key] = child
        return type(batch)(*items) if hasattr(batch, "_fields") else tuple(items)
    return dataclasses.replace(batch, **{key: child})


def slice_batch(batch: Any, size: int, index: slice) -> Any:
    """``batch`` with every tensor whose first dimension is ``size`` sliced by ``index`` (others kept)."""

    def cut(t: Tensor) -> Tensor:
        return t[index] if t.ndim > 0 and t.shape[0] == size else t

    return apply_to_collection(batch, Tensor, cut)


def first_samples(batch: Any, k: int) -> Any | None:
    """``batch`` cut to its first ``k`` samples (every tensor whose first dimension is the first tensor's), or None
    when it has no tensor with a first dimension above ``k``."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim > 0 else None)
    if not sizes or sizes[0] <= k:
        return None
    return slice_batch(batch, sizes[0], slice(0, k))


#: Dict keys tried, in order, for a batch's class labels (a tuple batch's are its second entry).
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def find_labels(batch: Any, target_key: Any = None) -> Any:
    """The labels of ``batch``: ``batch[target_key]``, a tuple's second entry, or a dict's first :data:`TARGET_KEYS`
    entry; None where there is none (the caller says what it needed)."""
    if target_key is not None:
        return batch[target_key]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        return batch[key] if key is not None else None
    return None


def class_labels(batch: Any, target_key: Any, owner: str, where: str = "each batch") -> Tensor:
    """:func:`find_labels`, required to be a (B,) integer tensor, or a clear error naming ``target_key`` as the fix."""
    found = find_labels(batch, target_key)
    if not isinstance(found, Tensor) or found.is_floating_point() or found.ndim != 1:
        raise ValueError(f"{owner} needs integer class labels in {where}: a tuple's second entry or one of the keys "
                         f"{list(TARGET_KEYS)}; this loader yields no such labels (got {type(found).__name__}). Pass "
                         f"`target_key=` to say where they are.")
    return found
