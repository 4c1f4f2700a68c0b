"""SpectralNormPenalty: weight · Σ σ(W)² over the Linear/Conv/Bilinear layers, warm-started power iteration."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from typing_extensions import override

from lightning_gp._lightning.setup_checks import vectors_fit
from lightning_gp.callbacks._base import PenaltyCallback
from lightning_gp.functional import spectral_norm_penalty
from lightning_gp.functional._checks import check_positive_int
from lightning_gp.step._chain import ORDER, StepContext
from lightning_gp.step._objective import Objective


class SpectralNormPenalty(PenaltyCallback):
    r"""Adds ``weight · Σ_W σ(W)²`` (Yoshida & Miyato 2017) to the loss, σ by power iteration.

    The singular vectors are warm-started from the previous step (``n_iter`` iterations a step; the first
    runs ``COLD_START_ITERS``) and checkpointed, so a resumed run continues exactly. Reused on another
    model, vectors that do not fit its layers are dropped (a cold start). The estimate
    approaches σ from below. The penalty does not depend on the batch: under DDP every rank computes the
    same value. Logs ``penalty/spectral_norm`` (Σσ², before the weight).

    Args:
        weight: ≥ 0.
        n_iter: power iterations per step, ≥ 1.
        check_finite: check every step's loss, penalty and gradients before the update.

    Raises:
        ValueError: an invalid argument, or a module without Linear, Conv or Bilinear layers.
        FloatingPointError: a step whose loss, penalty or gradient (after DDP's all-reduce) is NaN/Inf; every
            rank raises.

    Example:

        >>> from lightning_gp.manual import penalized_loss
        >>> net = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.diag(torch.tensor([3.0, 1.0])))
        >>> penalty = SpectralNormPenalty(0.1)
        >>> total = penalized_loss(net, lambda b: net(b).sum(), torch.ones(1, 2), [penalty])
        >>> round(float(total.detach()) - 4.0, 4)  # loss 4, plus 0.1 · σ² = 0.1 · 9
        0.9
        >>> sorted(penalty.vectors)
        ['']
    """

    order = ORDER["SpectralNormPenalty"]  # its place in the chain: _chain.ORDER
    log_name = "penalty/spectral_norm"

    def __init__(self, weight: float, *, n_iter: int = 1, check_finite: bool = True) -> None:
        super().__init__(weight, 1, check_finite)
        self.n_iter = check_positive_int(n_iter, "n_iter", type(self).__name__)
        self.vectors: dict[str, torch.Tensor] = {}
        self._fitted = False  # the warm-start vectors are checked against the model at the first step after setup

    @override
    def unsupported_when_sharded(self) -> str | None:
        return "its power iteration multiplies whole weight matrices"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._fitted = False

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vectors": {k: v.detach().clone() for k, v in self.vectors.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        vectors = state_dict.get("vectors", {})
        for key, u in vectors.items():  # one NaN vector would make every later σ NaN, steps after the resume
            if not torch.isfinite(u).all():
                raise ValueError(
                    f"{type(self).__name__}: the checkpoint's state `vectors[{key!r}]` holds NaN/Inf, so σ of that "
                    f"layer would be NaN from the first step on. Delete that entry from the checkpoint's callback "
                    f"state (its layer then starts cold), or resume from an earlier checkpoint."
                )
        super().load_state_dict(state_dict)
        self.vectors = {k: v.clone() for k, v in vectors.items()}
        self._fitted = False

    def apply(self, ctx: StepContext, batch: Any, inner: Callable[[Any], Objective]) -> Objective:
        objective = inner(batch)
        if not self._fitted:
            # Vectors of another model (the callback reused on a wider one): start cold for this model.
            if not vectors_fit(self.vectors, ctx.module):
                self.vectors = {}
            self._fitted = True
        # A cold start (no vectors yet) lets the functional layer choose its converging iteration count.
        n_iter = self.n_iter if self.vectors else None
        penalty = spectral_norm_penalty(ctx.module, n_iter=n_iter, vectors=self.vectors)
        self.check_and_log(ctx, self.log_name, penalty)
        self.applied += 1
        return objective.add(self.weight * penalty)
