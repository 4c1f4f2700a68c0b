"""A module's buffers saved before an extra pass and put back after it, bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


class BufferSnapshot:
    """Copies of every buffer of ``module`` (BatchNorm's running statistics among them), for :meth:`restore`."""

    def __init__(self, module: nn.Module | None) -> None:
        self.saved = [] if module is None else [(b, b.detach().clone()) for b in module.buffers()]

    def restore(self) -> None:
        # Through ``.data``: a backward node may hold a buffer (BatchNorm's does, without using its values in
        # training mode), and an ordinary in-place copy would bump its version counter. Every buffer, since
        # BatchNorm's kernel updates its statistics without a version bump.
        for buf, value in self.saved:
            buf.data.copy_(value)


@contextlib.contextmanager
def restored_buffers(module: nn.Module | None) -> Iterator[None]:
    """Run the block; ``module``'s buffers are put back on exit (nothing to do for None)."""
    snapshot = BufferSnapshot(module)
    try:
        yield
    finally:
        snapshot.restore()
