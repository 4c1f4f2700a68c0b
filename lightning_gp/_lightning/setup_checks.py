"""What the callbacks and monitors check in ``setup`` (and on loading a checkpoint): strategy, step, module."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

#: Strategies the package is tested with. FSDP1 (``FSDPStrategy``, CUDA only) and DeepSpeed stay refused until a
#: GPU run has tested them.
SUPPORTED = ("SingleDeviceStrategy (CPU or one GPU), DDPStrategy (strategy='ddp', 'ddp_spawn', ...) and, for the "
             "callbacks and monitors listed in docs/scaling.md, ModelParallelStrategy (FSDP2, tensor_parallel_size=1)")
#: What runs under FSDP2 (ModelParallelStrategy with fully_shard), for the refusals to name.
SHARDED_SUPPORTED = ("AdversarialTraining, VirtualAdversarialTraining, Flooding, DataGradientPenalty and "
                     "ParameterGradientPenalty with method='finite_difference' (the parameter penalty and "
                     "SharpnessAwareMinimization with scope='global'), and GradientNormMonitor")


def check_strategy(trainer: pl.Trainer, owner: str, sharded: str | None = "it reads whole parameters") -> None:
    """Raise a clear error for a strategy ``owner`` does not support.

    Args:
        sharded: why ``owner`` cannot run under FSDP2 (``ModelParallelStrategy``), or None where it can.

    Raises:
        RuntimeError: naming the strategy, the feature and what is supported.
    """
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        if sharded is not None:
            raise RuntimeError(
                f"{owner} does not run under `ModelParallelStrategy` (FSDP2): {sharded}, and FSDP2 splits each "
                f"parameter across ranks. Under FSDP2 the package supports {SHARDED_SUPPORTED}. Train with "
                f"strategy='ddp', or remove {owner}."
            )
        tp = strategy.device_mesh["tensor_parallel"].size()
        if tp > 1:
            raise RuntimeError(
                f"{owner} under `ModelParallelStrategy(tensor_parallel_size={tp})`: tensor parallelism splits a "
                f"layer's computation across ranks, and the package's passes assume each rank computes the whole "
                f"model on its own samples. Use tensor_parallel_size=1 (FSDP2 data parallelism), or remove {owner}."
            )
        return
    supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and "DeepSpeed" not in type(strategy).__name__
    if not supported:
        raise RuntimeError(
            f"{owner} does not support `{type(strategy).__name__}`: it needs whole (unsharded) parameters on "
            f"every rank, and this strategy has not been tested on a GPU yet. Supported: {SUPPORTED}. Use one of "
            f"these, or remove {owner}."
        )


def sharded_training(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` trains sharded (``ModelParallelStrategy``: FSDP2)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


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
