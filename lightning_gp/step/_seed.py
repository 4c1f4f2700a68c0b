"""The package's one seeding policy (:class:`RunSeed`): what a callback, the GAN mixin or a monitor draws is a
function of one base seed and of what the draw depends on (rank, step, stream), never of the global random stream.
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_gp.functional._rng import mixed_seed, seeded_generator


class RunSeed:
    """A base seed chosen once, the same on every rank, and saved in checkpoints.

    At :meth:`setup` it is rank 0's ``torch.initial_seed()`` (``seed_everything`` sets it), broadcast; a checkpoint
    loaded after puts back the one the run started with, so a resumed run draws what the uninterrupted one drew even
    when the new process was seeded otherwise. Before any setup (a manual loop) it reads ``torch.initial_seed()``.

    Example:


        >>> seed = RunSeed()
        >>> seed.setup()
        >>> seed.mixed(3, 1) == RunSeed.from_state(seed.state_dict()).mixed(3, 1)
        True
    """

    def __init__(self) -> None:
        self.value: int | None = None

    def setup(self, strategy: Any = None) -> None:
        """Choose the seed (kept if already chosen or loaded): rank 0's, on every rank of ``strategy``."""
        if self.value is not None:
            return
        seed = torch.initial_seed()
        if strategy is not None and strategy.world_size > 1:
            seed = strategy.broadcast(seed, src=0)
        self.value = int(seed)

    @property
    def base(self) -> int:
        return self.value if self.value is not None else torch.initial_seed()

    def mixed(self, *values: int) -> int:
        """A seed for the draws that depend on ``values`` (rank, step, stream, ...)."""
        return mixed_seed(self.base, *values)

    def generator(self, device: torch.device | str, *values: int) -> torch.Generator:
        """A generator on ``device`` for the draws that depend on ``values``."""
        return seeded_generator(device, self.base, *values)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the checkpoint's seed (a checkpoint from before seeds were saved keeps the current one)."""
        if state.get("seed") is not None:
            self.value = int(state["seed"])

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunSeed:
        seed = cls()
        seed.load_state_dict(state)
        return seed
