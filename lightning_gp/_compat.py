"""The package's only reads of torch internals that have no public equivalent (see tests/test_compat.py)."""

from __future__ import annotations

from torch import Tensor


def tensor_version(t: Tensor) -> int:
    """The in-place modification counter of ``t`` (``Tensor._version``; torch has no public accessor).

    Used to tell that a recorded activation was modified in place after it was recorded.
    """
    return t._version
