"""The package's random streams: seeds mixed from integers, and the global state saved, forked and replayed.

A finite-difference pass must see the same dropout masks as the pass it differences against, an extra pass
must not consume the training run's random stream, and what a callback draws (attack starts, VAT directions)
must be a function of (seed, rank, step, ...), so a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

_MASK64 = (1 << 64) - 1


def mixed_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (the splitmix64 finalizer over a running hash).

    Example:


        >>> mixed_seed(0, 1) == mixed_seed(0, 1) != mixed_seed(1, 0)
        True
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


def seeded_generator(device: torch.device | str, *values: int) -> torch.Generator:
    """A generator on ``device`` seeded with :func:`mixed_seed` of ``values``: draws that depend on nothing else."""
    return torch.Generator(device=device).manual_seed(mixed_seed(*values))


def _generators(devices: Iterable[torch.device]) -> list[torch.Generator]:
    """The CPU generator, and the default generator of every CUDA device among ``devices``."""
    generators = [torch.default_generator]
    seen: set[int] = set()
    for device in devices:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index not in seen:
                seen.add(index)
                generators.append(torch.cuda.default_generators[index])
    return generators


@dataclass(frozen=True)
class RNGState:
    """The state of the generators that passes on ``devices`` draw from (the CPU's always included)."""

    devices: tuple[torch.device, ...]
    states: tuple[Tensor, ...]

    @classmethod
    def capture(cls, *devices: torch.device) -> RNGState:
        return cls(devices, tuple(g.get_state() for g in _generators(devices)))

    def restore(self) -> None:
        for g, state in zip(_generators(self.devices), self.states, strict=True):
            g.set_state(state)


@contextlib.contextmanager
def forked_rng(*devices: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run the block on its own random stream (seeded with ``seed`` if given); the state is restored after."""
    saved = RNGState.capture(*devices)
    if seed is not None:
        for g in _generators(devices):
            g.manual_seed(seed)
    try:
        yield
    finally:
        saved.restore()


@contextlib.contextmanager
def replayed_rng(state: RNGState) -> Iterator[None]:
    """Run the block with the random state ``state`` saved before an earlier pass (the same dropout masks),
    then put back the state the block found."""
    current = RNGState.capture(*state.devices)
    state.restore()
    try:
        yield
    finally:
        current.restore()
