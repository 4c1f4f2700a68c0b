"""A module's buffers saved before an extra pass and put back after it, bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

#: ``restored_buffers(CALLED)``: the buffers of every module that runs in the block, found as they run.
CALLED = "called"


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
def restored_buffers(module: nn.Module | Literal["called"] | None) -> Iterator[None]:
    """Run the block; ``module``'s buffers are put back on exit (nothing to do for None).

    With :data:`CALLED` the modules are those the block runs (a function given parameters, not its module): a
    global forward pre-hook saves each one's own buffers before its first call, so a BatchNorm in training mode
    updates its statistics once per step, as without the extra pass.
    """
    if module != CALLED:
        snapshot = BufferSnapshot(module)
        try:
            yield
        finally:
            snapshot.restore()
        return
    snapshots: dict[int, BufferSnapshot] = {}

    def save(mod: nn.Module, args: tuple) -> None:
        if id(mod) not in snapshots and next(mod.buffers(recurse=False), None) is not None:
            snapshots[id(mod)] = _OwnBuffers(mod)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(save)
    try:
        yield
    finally:
        handle.remove()
        for snapshot in snapshots.values():
            snapshot.restore()


class _OwnBuffers(BufferSnapshot):
    """A module's own buffers (its submodules save theirs when they run)."""

    def __init__(self, module: nn.Module) -> None:
        self.saved = [(b, b.detach().clone()) for b in module.buffers(recurse=False)]


@contextlib.contextmanager
def module_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module`` in train (``training=True``) or eval mode for the block; every submodule's own mode put back
    after (a user's frozen BatchNorm stays in eval mode, where ``module.train()`` would flip it)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(training)
        yield module
    finally:
        for m, mode in modes:
            m.training = mode
