"""SpectralNormMonitor: σ(W) of every Linear/Conv layer and their product, a Lipschitz upper bound."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_gp._lightning.log_writer import define_summaries
from lightning_gp._lightning.logging import logger_step
from lightning_gp._lightning.setup_checks import vectors_fit
from lightning_gp.functional._checks import check_positive_int
from lightning_gp.functional._layers import LINEAR_MAP_LAYERS
from lightning_gp.functional.spectral import spectral_norm
from lightning_gp.monitors._base import Monitor

#: Layers whose weight is a linear map of the layer's input (conv kernels as their reshaped matrix).
MONITORED_LAYERS = LINEAR_MAP_LAYERS


class SpectralNormMonitor(Monitor):
    """Logs the spectral norm σ(W) of each Linear/Conv layer and the product of all of them.

    For a chain of layers with 1-Lipschitz activations (ReLU, tanh, LeakyReLU, ...), ‖f(x) − f(x')‖ ≤
    Πₜ σ(W⁽ᵗ⁾) · ‖x − x'‖: the product is an upper bound of the network's Lipschitz constant — loose, but
    it is what spectral-norm regularization and weight decay act on. For conv layers σ is that of the
    kernel reshaped to (out, in·k), as in spectral normalization, which bounds the conv operator's norm
    only up to a factor √(number of kernel positions); the product is a strict bound for Linear chains.

    σ comes from `lightning_gp.functional.spectral_norm`, warm-started from the previous call's
    singular vector (kept in the checkpoint). Power iteration approaches σ from below; ``n_iter`` warm
    iterations per call keep the error far below what the weights move between calls.

    Logged, every ``every_n_steps`` optimizer steps (default: the trainer's ``log_every_n_steps``):
    ``lipschitz/sigma/<layer name>`` and ``lipschitz/upper_bound`` (W&B summary: max over the run).
    Weights are equal on every DDP rank, so every rank computes the same values and nothing is reduced.

    Args:
        every_n_steps: measure on every k-th optimizer step; None follows ``Trainer(log_every_n_steps)``.
        n_iter: warm-started power iterations per call (the first call uses a 30-iteration cold start).

    Example:


        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
        ...     _ = net[2].weight.fill_(1.0)  # σ = √2
        >>> monitor = SpectralNormMonitor(every_n_steps=100)  # then: Trainer(callbacks=[monitor])
        >>> {k: round(float(v), 4) for k, v in monitor.measure(net).items()}
        {'lipschitz/sigma/0': 3.0, 'lipschitz/sigma/2': 1.4142, 'lipschitz/upper_bound': 4.2426}
    """

    needs_batch = False  # it reads the weights only

    def __init__(self, *, every_n_steps: int | None = None, n_iter: int = 10) -> None:
        super().__init__(every_n_steps)
        self.n_iter = check_positive_int(n_iter, "n_iter", type(self).__name__)
        self._vectors: dict[str, Tensor] = {}

    @override
    def unsupported_when_sharded(self) -> str | None:
        return "its power iteration multiplies whole weight matrices"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self._layers(pl_module):
            raise ValueError(
                f"SpectralNormMonitor found no Linear or Conv layer in {type(pl_module).__name__}; "
                "there is no weight to take the spectral norm of."
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        define_summaries(trainer, {"lipschitz/upper_bound": "max"})

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._due(trainer):
            return
        self._log(trainer, self.measure(pl_module), logger_step(trainer))

    @torch.no_grad()
    def measure(self, pl_module: nn.Module) -> dict[str, Tensor]:
        """``{"lipschitz/sigma/<name>": σ, ..., "lipschitz/upper_bound": Π σ}`` for the current weights."""
        if not vectors_fit(self._vectors, pl_module):  # reused on another model: start cold
            self._vectors = {}
        out: dict[str, Tensor] = {}
        product = None
        for name, layer in self._layers(pl_module):
            u = self._vectors.get(name)
            sigma, u = spectral_norm(layer.weight, n_iter=self.n_iter if u is not None else None, u=u)
            self._vectors[name] = u
            out[f"lipschitz/sigma/{name}"] = sigma
            product = sigma if product is None else product * sigma
        out["lipschitz/upper_bound"] = product
        return out

    @staticmethod
    def _layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in module.named_modules() if isinstance(m, MONITORED_LAYERS)]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"vectors": {k: v.detach().cpu() for k, v in self._vectors.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._vectors = dict(state_dict.get("vectors", {}))
