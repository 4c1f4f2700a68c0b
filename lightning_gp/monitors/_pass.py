"""What a monitor's pass runs: the model as the training step runs it, or the user's explicit forward.

A monitor that runs the model itself must measure the function being trained. With neither ``forward_fn`` nor
``loss_fn`` its pass is the module's own ``training_step`` on the step's batch (every entry of the batch reaches the
model as in training: masks, token types, position ids, labels), and the per-sample values are read off the scalar
loss the step returns, by its ``loss_reduction`` (checked once on the two half-batches). The explicit form is
``forward_fn(module, batch) -> outputs`` with a per-sample ``loss_fn(outputs, batch) -> (B,)``; a ``loss_fn`` alone
calls ``module(input)``, which the monitor accepts only where the batch holds nothing else for the model to take
(the input and at most one more tensor, the targets). Design notes: ``docs/monitors.md``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from lightning_gp.functional._checks import check_callable
from lightning_gp.step._batch import describe, resolve_input
from lightning_gp.step._chain import PassRNG, SkipBatch, extra_pass
from lightning_gp.step._objective import extract_loss
from lightning_gp.step._reduction import check_reduction
from lightning_gp.step.interception import StepInterceptor

#: ``forward_fn(module, batch)`` → the outputs a per-sample ``loss_fn`` takes.
ForwardFn = Callable[[nn.Module, Any], Any]
#: ``loss_fn(outputs, batch)`` → per-sample losses, shape (B,).
PerSampleLoss = Callable[[Any, Any], Tensor]


def step_function(module: nn.Module) -> Callable[..., Any]:
    """The user's own ``training_step`` (not the package's wrapper of it)."""
    interceptor = StepInterceptor.of(module)
    return interceptor.original if interceptor is not None else module.training_step


def _takes_batch_idx(step_fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(step_fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def step_loss(module: nn.Module, batch: Any, batch_idx: int, owner: str, rng: PassRNG = None) -> Tensor:
    """The scalar loss of the module's own ``training_step`` on ``batch``, as an extra pass (``_chain.extra_pass``)
    on the random stream ``rng``.

    Raises:
        SkipBatch: the step returned None.
    """
    step_fn = step_function(module)
    with extra_pass(module, rng):
        out = step_fn(batch, batch_idx) if _takes_batch_idx(step_fn) else step_fn(batch)
    if out is None:
        raise SkipBatch
    return extract_loss(out, owner)


def batch_size(batch: Any, input_key: Any, mask: Tensor | None, owner: str) -> int:
    """How many samples ``batch`` holds: the input's first dimension where ``input_key`` finds one, else the mask's,
    else that of the batch's first tensor."""
    try:
        return int(resolve_input(batch, input_key, owner, computed=True)[0].shape[0])
    except (ValueError, IndexError):
        pass
    if mask is not None:
        return int(mask.shape[0])
    for _, t in tensor_entries(batch):
        if t.ndim > 0:
            return int(t.shape[0])
    raise ValueError(f"{owner}: the batch {describe(batch)} holds no tensor with a batch dimension.")


def tensor_entries(batch: Any, path: str = "") -> list[tuple[str, Tensor]]:
    """``[(path, tensor)]`` of every tensor in a (nested) batch, paths written as a user indexes them."""
    if isinstance(batch, Tensor):
        return [(path or "batch", batch)]
    if isinstance(batch, Mapping):
        items = [(f"{path}[{k!r}]", v) for k, v in batch.items()]
    elif isinstance(batch, (tuple, list)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(batch)]
    elif dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        items = [(f"{path}.{f.name}", getattr(batch, f.name)) for f in dataclasses.fields(batch)]
    else:
        return []
    return [entry for p, v in items for entry in tensor_entries(v, p)]


def check_implicit_forward(batch: Any, inputs: Tensor, owner: str) -> None:
    """``loss_fn`` without ``forward_fn`` calls ``module(input)``: refuse a batch with more for the model to take.

    Raises:
        ValueError: besides the input, the batch holds more than one tensor (the targets): an attention mask, token
            types or position ids would not reach the model, which would then not be the function trained.
    """
    others = [p for p, t in tensor_entries(batch) if t is not inputs]
    if len(others) <= 1:
        return
    raise ValueError(
        f"{owner}(loss_fn=...) without `forward_fn` calls the module on the input alone, `module(input)`, but the "
        f"batch also holds {', '.join(others)} ({describe(batch)}): an attention mask, token types or position ids "
        f"would not reach the model, which would not be the function being trained. Drop `loss_fn` to measure "
        f"the loss `training_step` returns (the default), or pass `forward_fn=lambda module, batch: ...` calling the "
        f"model as `training_step` does, e.g. `lambda module, batch: module.model(input_ids=batch['input_ids'], "
        f"attention_mask=batch['attention_mask'])`."
    )


class MonitorPass:
    """A monitor's choice of pass (see the module docstring), checked in ``setup`` and at the first measurement."""

    def __init__(self, owner: str, forward_fn: ForwardFn | None, loss_fn: PerSampleLoss | None,
                 loss_reduction: str, check_reduction: bool = True) -> None:
        for name, fn, signature in (("forward_fn", forward_fn, "(module, batch) -> outputs"),
                                    ("loss_fn", loss_fn, "(outputs, batch) -> (B,)")):
            if fn is not None:
                check_callable(fn, name, f"callable {signature}", owner)
        self.owner = owner
        self.forward_fn, self.loss_fn = forward_fn, loss_fn
        self.loss_reduction = loss_reduction
        self.check_reduction = check_reduction
        self._checked = False

    @property
    def checked(self) -> bool:
        """Whether ``loss_reduction`` has been checked (or the check is off)."""
        return self._checked or not self.check_reduction

    @property
    def of_step(self) -> bool:
        """Whether the pass is the module's own ``training_step`` (neither ``forward_fn`` nor ``loss_fn`` given)."""
        return self.forward_fn is None and self.loss_fn is None

    def setup(self, pl_module: pl.LightningModule) -> None:
        """Refuse, before training, a step the monitor cannot re-run (manual optimization steps the optimizers)."""
        self._checked = False
        if self.of_step and not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{self.owner} measures by default the loss `training_step` returns, re-running it on the step's "
                f"batch; `{type(pl_module).__name__}` uses manual optimization, whose `training_step` steps the "
                f"optimizers itself. Pass `forward_fn=lambda module, batch: <outputs>` and `loss_fn=lambda outputs, "
                f"batch: <per-sample losses (B,)>` for the function to measure (e.g. the critic of a GAN)."
            )

    def loss(self, module: nn.Module, batch: Any, batch_idx: int) -> Tensor:
        """The scalar loss of the module's own ``training_step`` on ``batch``, as an extra pass."""
        return step_loss(module, batch, batch_idx, self.owner)

    def check_once(self, module: nn.Module, batch: Any, batch_idx: int, n: int, loss: Tensor,
                   strategy: Any = None) -> None:
        """At the first measurement: ``loss_reduction`` against the loss of the batch's two halves (without grad;
        every rank takes rank 0's verdict). ``loss`` is the step's loss on the whole ``batch`` of ``n`` samples.

        Raises:
            ValueError: the loss behaves like the other reduction.
        """
        if not self.check_reduction or self._checked:
            return
        self._checked = True

        def run(half: Any) -> Tensor | None:
            try:
                return self.loss(module, half, batch_idx)
            except SkipBatch:
                return None

        world = 1 if strategy is None else strategy.world_size
        check_reduction(self.owner, self.loss_reduction, run, batch, n, loss,
                        (lambda t: strategy.broadcast(t, src=0)) if world > 1 else None)
