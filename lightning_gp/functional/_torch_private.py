"""Every private name of torch that lightning-gp reads, each behind one accessor.

torch offers no public route to these facts; nothing else in the package touches a private attribute or
module of torch, and ``tests/_lightning/test_private_names.py`` fails and names the accessor when a torch release moves
one. Lightning's private names live in :mod:`lightning_gp._lightning.private`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

# torch has no public pytree module in the versions we support (``torch.utils.pytree`` is not in 2.6,
# nor in later releases so far); ``torch.utils._pytree`` is what torch.func itself uses.
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

__all__ = ["BatchNormBase", "DropoutBase", "compiled_original", "foreach_add", "foreach_add_", "foreach_copy_",
           "foreach_mul", "qkv_same_embed_dim", "reversed_padding", "tensor_version", "tree_flatten", "tree_map",
           "tree_unflatten"]

#: The base of BatchNorm1d/2d/3d, SyncBatchNorm and their Lazy variants (``torch.nn.modules.batchnorm``).
BatchNormBase: type[nn.Module] = nn.modules.batchnorm._BatchNorm
#: The base of Dropout, Dropout1d/2d/3d, AlphaDropout and FeatureAlphaDropout.
DropoutBase: type[nn.Module] = nn.modules.dropout._DropoutNd


def foreach_add(tensors: list[Tensor], others: list[Tensor], alpha: float) -> list[Tensor]:
    """``t + alpha·o`` for every pair into new tensors, in a few fused kernels (``torch._foreach_add``)."""
    return list(torch._foreach_add(tensors, others, alpha=alpha))


def foreach_add_(tensors: list[Tensor], others: list[Tensor], alpha: float) -> None:
    """``t += alpha·o`` for every pair, in a few fused kernels (``torch._foreach_add_``, what the optimizers use)."""
    torch._foreach_add_(tensors, others, alpha=alpha)


def foreach_copy_(tensors: list[Tensor], sources: list[Tensor]) -> None:
    """``t.copy_(s)`` for every pair, fused (``torch._foreach_copy_``)."""
    torch._foreach_copy_(tensors, sources)


def foreach_mul(tensors: list[Tensor], scalar: Tensor) -> list[Tensor]:
    """``t * scalar`` for every tensor, fused (``torch._foreach_mul``)."""
    return list(torch._foreach_mul(tensors, scalar))


def tensor_version(t: Tensor) -> int:
    """The tensor's version counter, bumped by every in-place operation (``Tensor._version``).

    Autograd uses it to detect a saved tensor modified in place; torch has no public equivalent.
    """
    return t._version


def reversed_padding(conv: nn.Module) -> tuple[int, ...]:
    """The ``F.pad`` argument a convolution applies for ``padding_mode != "zeros"`` and string paddings
    (``_reversed_padding_repeated_twice``), computed once by torch from ``padding`` and the kernel."""
    return tuple(conv._reversed_padding_repeated_twice)


def qkv_same_embed_dim(attention: nn.MultiheadAttention) -> bool:
    """Whether a ``MultiheadAttention`` keeps q, k, v in one ``in_proj_weight`` (``_qkv_same_embed_dim``)."""
    return bool(attention._qkv_same_embed_dim)


def compiled_original(module: Any) -> nn.Module | None:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) compiles (``_orig_mod``), else None."""
    original = getattr(module, "_orig_mod", None)
    return original if isinstance(original, nn.Module) else None
