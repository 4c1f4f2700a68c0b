"""Saving and replaying the global random state (the CPU generator and that of a CUDA device).

A finite-difference pass must see the same dropout masks as the pass it differences against, and an
extra pass must not consume the training run's random stream; both are a save and a restore of the
generators that the device's random ops draw from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


def _generators(device: torch.device) -> list[torch.Generator]:
    """The CPU generator, and the default generator of ``device`` when it is a CUDA device."""
    generators = [torch.default_generator]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        generators.append(torch.cuda.default_generators[index])
    return generators


@dataclass(frozen=True)
class RNGState:
    """The state of the generators a pass on ``device`` draws from (see :func:`_generators`)."""

    device: torch.device
    states: tuple[Tensor, ...]

    @classmethod
    def capture(cls, device: torch.device) -> RNGState:
        return cls(device, tuple(g.get_state() for g in _generators(device)))

    def restore(self) -> None:
        for g, state in zip(_generators(self.device), self.states, strict=True):
            g.set_state(state)


@contextlib.contextmanager
def forked_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run the block on its own random stream (seeded with ``seed`` if given); the state is restored after."""
    saved = RNGState.capture(device)
    if seed is not None:
        for g in _generators(device):
            g.manual_seed(seed)
    try:
        yield
    finally:
        saved.restore()


@contextlib.contextmanager
def replayed_rng(state: RNGState) -> Iterator[None]:
    """Run the block with the random state ``state`` saved before an earlier pass (the same dropout masks),
    then put back the state the block found."""
    current = RNGState.capture(state.device)
    state.restore()
    try:
        yield
    finally:
        current.restore()

