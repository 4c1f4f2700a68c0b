"""AutoAttack-grade robust accuracy at the end of validation, logged for checkpoints and early stopping."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_gp._lightning.log_writer import log_settings
from lightning_gp._lightning.progress import validation_progress
from lightning_gp._lightning.setup_checks import check_strategy
from lightning_gp.functional._checks import check_callable, check_choice, check_number, check_positive_int
from lightning_gp.functional.robust import (
    EPS_HINT,
    NORMS,
    RobustNorm,
    check_bounds,
    resolve_attacks,
    robust_outcomes,
)
from lightning_gp.step._batch import InputKey, class_labels, resolve_input

PREFIX = "robust"
#: where a batch's labels are found when ``target_key`` is None: a tuple's second entry, or one of these keys


class _Logits(nn.Module):
    """The LightningModule as an ``inputs → logits`` model (``logits_fn(module, x)``, or ``module(x)``)."""

    def __init__(self, module: nn.Module, logits_fn: Callable[[nn.Module, Tensor], Tensor] | None) -> None:
        super().__init__()
        self.module, self.logits_fn = module, logits_fn

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) if self.logits_fn is None else self.logits_fn(self.module, x)


class RobustAccuracy(Callback):
    """Robust accuracy as papers report it: AutoAttack on a fixed validation subset, every few epochs.

    At the end of every ``every_n_epochs``-th validation epoch (and on ``trainer.validate``), the first
    ``n_samples`` samples of the first validation dataloader (the same ones each time) are attacked, seeded by
    ``seed``: ``"standard"`` is AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square, each on the samples
    still robust; from torchattacks, ``pip install --no-deps torchattacks``). Logs ``robust/clean_accuracy``,
    ``robust/accuracy`` (the worst case over all attacks) and ``robust/accuracy/<attack>`` (after that attack,
    cumulative), for ``ModelCheckpoint(monitor="robust/accuracy", mode="max")``. The model is attacked in eval
    mode and float32 and put back exactly as found. Under DDP each rank attacks its share and the counts are
    summed. Not under FSDP2 (refused in ``setup``).

    Args:
        eps: the threat model's radius (l∞ 8/255, not 0.031; l2 0.5).
        norm: "linf" or "l2".
        attacks: "standard", "fast" (APGD-CE, APGD-T) or a list of "apgd-ce", "apgd-t", "fab-t", "square", "pgd-20".
        n_samples: how many validation samples.
        every_n_epochs: how often, in validation epochs.
        batch_size: attack this many samples at a time (all at once when None).
        seed: seeds every attack.
        bounds: the box the inputs live in.
        input_key: where a batch holds its inputs (default: a tuple's first entry, or the keys x/input/inputs).
        target_key: where it holds the labels (default: a tuple's second entry, or y/label(s)/target(s)).
        logits_fn: ``(module, x) → logits`` where ``module(x)`` does not return them.

    Raises:
        ValueError: ε ≤ 0, an unknown attack (with the nearest name), bad counts or bounds; at the first
            evaluation: inputs outside ``bounds``, fewer than 2 classes, a loader without labels.

    Example:

        >>> RobustAccuracy(8 / 255, attacks="fast", n_samples=500, every_n_epochs=5)
        RobustAccuracy(eps=0.0314, norm='linf', attacks=['apgd-ce', 'apgd-t'], n_samples=500, every_n_epochs=5)
    """

    def __init__(self, eps: float, *, norm: RobustNorm = "linf", attacks: str | Sequence[str] = "standard",
                 n_samples: int = 1000, every_n_epochs: int = 1, batch_size: int | None = None, seed: int = 0,
                 bounds: tuple[float, float] | None = (0.0, 1.0), input_key: InputKey = None,
                 target_key: str | int | None = None,
                 logits_fn: Callable[[nn.Module, Tensor], Tensor] | None = None) -> None:
        owner = type(self).__name__
        self.attacks = list(resolve_attacks(attacks, owner))
        self.eps = check_number(eps, "eps", owner, strict=True, fix=EPS_HINT)
        self.norm = check_choice(norm, "norm", NORMS, owner)
        self.n_samples = check_positive_int(n_samples, "n_samples", owner)
        self.every_n_epochs = check_positive_int(every_n_epochs, "every_n_epochs", owner)
        if batch_size is not None:
            check_positive_int(batch_size, "batch_size", owner)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"{owner}: `seed` must be an int, got {seed!r}.")
        if logits_fn is not None:
            check_callable(logits_fn, "logits_fn", "a callable (module, inputs) -> logits", owner)
        self.batch_size, self.seed = batch_size, seed
        self.bounds = check_bounds(bounds, owner)
        self.input_key, self.target_key, self.logits_fn = input_key, target_key, logits_fn
        self._samples: tuple[Tensor, Tensor] | None = None
        #: ``[{"epoch": e, "robust/accuracy": ..., ...}, ...]``, one entry an evaluation (checkpointed)
        self.history: list[dict[str, float]] = []

    @override
    def __repr__(self) -> str:
        return (f"{type(self).__name__}(eps={self.eps:.3g}, norm={self.norm!r}, attacks={list(self.attacks)}, "
                f"n_samples={self.n_samples}, every_n_epochs={self.every_n_epochs})")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_strategy(trainer, type(self).__name__, sharded="its attacks stop early on each rank's own samples, "
                       "so the ranks would run different numbers of forward passes through the sharded model")
        if any(a != "pgd-20" for a in self.attacks):  # fail before training, not at the first validation
            from lightning_gp.functional.robust import _torchattacks

            _torchattacks(type(self).__name__)
        log_settings(trainer, self)  # ε, the norm, the attacks ...: under lightning_gp/RobustAccuracy in every logger

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        values = self.evaluate(trainer, pl_module)
        for name, value in values.items():
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=False)
        self.history.append({"epoch": trainer.current_epoch, **{k: float(v) for k, v in values.items()}})

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        """Attack this rank's share of the samples and return the accuracies over all ranks' samples."""
        x, y = self._shard(self._collect(trainer), trainer)
        device = pl_module.device
        # in Lightning's own validation bar where it shows one (its count becomes the attacked samples)
        task = validation_progress(trainer, f"{type(self).__name__} ({', '.join(self.attacks)})",
                                   len(y) * len(self.attacks))
        try:
            outcome = robust_outcomes(_Logits(pl_module, self.logits_fn), x.to(device), y.to(device), self.eps,
                                      norm=self.norm, attacks=self.attacks, seed=self.seed, bounds=self.bounds,
                                      batch_size=self.batch_size, owner=type(self).__name__, progress=task.update)
        finally:
            task.close()
        counts = torch.stack([outcome.clean.sum(), outcome.robust.sum(),
                              *[outcome.after[a].sum() for a in self.attacks],
                              torch.tensor(len(y), device=device)]).float()
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        n = counts[-1].clamp_min(1)
        out = {f"{PREFIX}/clean_accuracy": counts[0] / n, f"{PREFIX}/accuracy": counts[1] / n}
        out.update({f"{PREFIX}/accuracy/{a}": c / n for a, c in zip(self.attacks, counts[2:-1], strict=True)})
        return out

    def _collect(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """The first ``n_samples`` (inputs, labels) of the first validation dataloader's dataset, in order (the
        same on every rank and at every evaluation), kept on the CPU after the first call."""
        if self._samples is not None:
            return self._samples
        owner = type(self).__name__
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
        if isinstance(loaders, dict):
            loader = next(iter(loaders.values()))
        if loader is None:
            raise ValueError(f"{owner} attacks validation samples, but the Trainer has no validation dataloader. "
                             f"Pass `val_dataloaders` to `fit` (or a datamodule with `val_dataloader`).")
        # a plain sequential pass over the same dataset: Lightning's DistributedSampler would give each rank
        # other samples; the RNG is forked (a DataLoader iterator draws a seed)
        plain = DataLoader(loader.dataset, batch_size=loader.batch_size or 1, shuffle=False, num_workers=0,
                           collate_fn=loader.collate_fn)
        xs, ys, got = [], [], 0
        with torch.random.fork_rng(devices=[]), torch.inference_mode(False):  # tensors the attacks can use
            for batch in plain:
                x = resolve_input(batch, self.input_key, owner)[0]
                y = class_labels(batch, self.target_key, owner, "each validation batch")
                xs.append(x.detach().cpu())
                ys.append(y.detach().cpu())
                got += len(y)
                if got >= self.n_samples:
                    break
        if not xs:
            raise ValueError(f"{owner}: the first validation dataloader yielded no samples.")
        self._samples = (torch.cat(xs)[: self.n_samples], torch.cat(ys)[: self.n_samples])
        return self._samples

    @staticmethod
    def _shard(samples: tuple[Tensor, Tensor], trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        """This rank's share: every world_size-th sample from its rank on."""
        x, y = samples
        if trainer.world_size == 1:
            return x, y
        return x[trainer.global_rank::trainer.world_size], y[trainer.global_rank::trainer.world_size]
