"""What the callbacks and monitors check in ``setup`` (and on loading a checkpoint): strategy, step, module."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

#: Strategies the package is tested with. Sharded ones (FSDP, DeepSpeed, ModelParallelStrategy) split the
#: parameters across ranks, and the per-sample norms and the parameter perturbations read whole parameters.
SUPPORTED = "SingleDeviceStrategy (CPU or one GPU) and DDPStrategy (strategy='ddp', 'ddp_spawn', ...)"


def check_strategy(trainer: pl.Trainer, owner: str) -> None:
    """Raise a clear error for a strategy the package does not support (sharded ones among them).

    Raises:
        RuntimeError: naming the strategy and what is supported.
    """
    strategy = trainer.strategy
    supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and "DeepSpeed" not in type(strategy).__name__
    if not supported:
        raise RuntimeError(
            f"{owner} does not support `{type(strategy).__name__}`: it needs whole (unsharded) parameters on "
            f"every rank. Supported: {SUPPORTED}. Use one of these, or remove {owner}."
        )


def check_batch_step(pl_module: pl.LightningModule, owner: str) -> None:
    """Refuse ``training_step(self, dataloader_iter)``: the step draws its own batches, so a callback can neither
    see the batch nor run the step on it again.

    Raises:
        RuntimeError: naming the step's signature and the two ways that work.
    """
    if "dataloader_iter" in inspect.signature(pl_module.training_step).parameters:
        raise RuntimeError(
            f"{owner} needs the batch of each step, but `{type(pl_module).__name__}.training_step(self, "
            f"dataloader_iter)` draws its own batches inside the step, where {owner} can neither see them nor run "
            f"the step again. Take the batch as `training_step(self, batch, batch_idx)`, or, keeping the iterator, "
            f"return `lightning_gp.manual.penalized_loss(self, loss_fn, batch, [...])` on the batch your step draws "
            f"(and remove {owner} from the Trainer)."
        )


def check_forward(module: Any, owner: str, fix: str) -> None:
    """Raise a clear error when ``module`` (that ``owner`` calls) defines no ``forward``.

    torch's own error ("missing the required forward function") would come mid-training and name no fix.
    """
    import torch

    forward = getattr(type(module), "forward", None)
    if forward in (torch.nn.Module.forward, pl.LightningModule.forward):
        raise NotImplementedError(
            f"{owner} calls `{type(module).__name__}(inputs)`, but `{type(module).__name__}` defines no `forward`. "
            f"{fix}"
        )


def vectors_fit(vectors: dict[str, Any], module: Any) -> bool:
    """True when every warm-start vector belongs to a layer of ``module`` with a weight of its length."""
    modules = dict(module.named_modules())
    for name, u in vectors.items():
        weight = getattr(modules.get(name), "weight", None)
        if not hasattr(weight, 'shape') or weight.ndim == 0 or tuple(u.shape) != (weight.shape[0],):
            return False
    return True
