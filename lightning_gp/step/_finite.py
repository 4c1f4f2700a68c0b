"""The step's finiteness check: no NaN/Inf reaches the parameters through lightning_gp without an error.

Checked once per optimizer step, just before the optimizer step, on what the step produced: the gradients
(after DDP's all-reduce, so a non-finite gradient on one rank is non-finite on every rank), the loss of
``training_step`` and every penalty value of the step (per rank). One sum per gradient tensor, in float32
(NaN and ±Inf propagate through a sum, and Inf − Inf is NaN: a finite sum cannot hide them; only a
gradient summing past 3·10³⁸ would be flagged while finite), one stack of the step's values, and under DDP
one all-reduce of a (2 + world_size)-vector of flags, so every rank takes the same decision and all raise together (one
rank raising alone would leave the others waiting in the next collective). Then **one host read**. The
error path (extra reads) names the culprit: a penalty value, the loss, or finite values with a non-finite
gradient (a NaN/Inf hidden in a per-sample norm), the rank, and the batch entries with non-finite values.

With a ``GradScaler`` (``precision="16-mixed"``), Inf/NaN gradients are the scaler's business: it skips
that step and lowers the scale, so the gradients are not checked. The loss and the penalty values are
computed unscaled: a NaN there is no scaling artifact and is still raised (an Inf, a possible fp16 overflow
the scaler's skip handles, is not).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_gp.functional._sharded import local

FIX = ("Fix the data (drop or `torch.nan_to_num` the non-finite samples), or lower the penalty's weight or the "
       "learning rate.")


@dataclass
class StepValues:
    """What one optimizer step produced, collected without a host read: (owner, name, value) triples."""

    losses: list[tuple[str, Tensor]] = field(default_factory=list)
    values: list[tuple[str, str, Tensor]] = field(default_factory=list)
    batches: list[Any] = field(default_factory=list)
    pending: bool = False

    def add_loss(self, loss: Tensor, batch: Any = None, what: str = "the loss returned by `training_step`") -> None:
        self.losses.append((what, loss.detach().reshape(())))
        if batch is not None:
            self.batches.append(batch)
        self.pending = True

    def add(self, owner: str, name: str, value: Tensor) -> None:
        self.values.append((owner, name, value.detach().reshape(())))
        self.pending = True

    def clear(self) -> None:
        self.losses, self.values, self.batches, self.pending = [], [], [], False


def check_step(values: StepValues, grads: Sequence[Tensor], *, step: int, strategy: Any = None,
               scaled: bool = False, grad_names: Callable[[], Sequence[str]] | Sequence[str] = (),
               caller: str = "lightning_gp",
               off_switch: str = "`check_finite=False` on the callbacks turns this check off.") -> None:
    """Raise ``FloatingPointError`` on every rank when any rank's step is non-finite (see the module docstring).

    ``scaled``: a GradScaler owns the step (gradients not checked, only NaN values raise). ``grad_names``:
    the gradients' parameter names, or a function returning them (called only to write the error).
    """
    # nn.Embedding(sparse=True): the values; FSDP2: the rank's shard (every shard is checked, on its own rank)
    grads = [g.coalesce().values() if g.is_sparse else local(g) for g in grads]
    device = grads[0].device if grads else next((v.device for _, v in values.losses), torch.device("cpu"))
    world = 1 if strategy is None else strategy.world_size
    rank = 0 if strategy is None else strategy.global_rank
    # Per-tensor sums, not the ∞-norm: `get_total_norm(grads, inf)` costs twenty times more on an MLP's CPU tensors
    # (docs/benchmarks.md), and -inf does not survive a max.
    sums = [] if scaled else [g.sum(dtype=torch.float32).to(device) for g in grads]
    own = [v.to(device=device, dtype=torch.float32) for _, v in values.losses] + [
        v.to(device=device, dtype=torch.float32) for _, _, v in values.values]

    def bad(t: Tensor) -> Tensor:  # with a GradScaler an Inf is its business (it skips the step), a NaN is not
        return t.isnan() if scaled else ~t.isfinite()

    if world == 1:  # one stack, one test, one read: this runs on every step of every callback
        if not sums and not own:
            return
        stacked = torch.stack(sums + own)
        if not bool(bad(stacked).any()):  # the one host read of the step
            return
        flags = None
    else:
        zero = torch.zeros((), device=device)
        grad_sum = torch.stack(sums).sum() if sums else zero
        if own:
            stacked = torch.stack(own)
            bad_values = bad(stacked).any().float()
        else:
            bad_values = zero
        ranks = torch.zeros(world, device=device)
        ranks[rank] = bad_values
        flags = strategy.reduce(torch.cat([(~grad_sum.isfinite()).float().reshape(1), bad_values.reshape(1), ranks]),
                                reduce_op="sum")
        if not bool(flags.any()):  # the one host read of the step
            return
    bad_ranks = [] if flags is None else [r for r in range(world) if flags[2 + r] > 0]
    raise FloatingPointError(_message(values, grads, grad_names, step=step, scaled=scaled, rank=rank, world=world,
                                      bad_ranks=bad_ranks, caller=caller, off_switch=off_switch))


def _message(values: StepValues, grads: Sequence[Tensor], grad_names: Sequence[str], *, step: int, scaled: bool,
             rank: int, world: int, bad_ranks: list[int], caller: str, off_switch: str) -> str:
    def bad(v: Tensor) -> bool:
        f = float(v)
        return math.isnan(f) if scaled else not math.isfinite(f)

    where = f" on rank {rank}" if world > 1 else ""
    lines = []
    for owner, name, v in values.values:
        if bad(v):
            lines.append(f"{owner}: `{name}` is {float(v)} (non-finite) at global step {step}{where}.")
    for what, v in values.losses:
        if bad(v):
            lines.insert(0, f"{what[0].upper()}{what[1:]} is {float(v)} at global step {step}{where}: it is "
                            f"non-finite before {caller} adds anything, so the model or the batch produces it.")
    if not lines and bad_ranks:
        lines.append(f"{caller}: rank(s) {bad_ranks} had a non-finite loss or penalty at global step {step}; this "
                     f"rank's values are finite (every rank raises, so that none waits in the next collective).")
    if not lines:
        all_names = grad_names() if callable(grad_names) else grad_names
        names = [n for n, g in zip(all_names, grads, strict=False) if not bool(g.isfinite().all())]
        shown = ", ".join(values_summary(values))
        shown = f" ({shown})" if shown else ""
        lines.append(
            f"{caller}: the gradient is non-finite at global step {step} although the loss and every penalty "
            f"are finite{shown}; parameters with a non-finite gradient: {names[:5] or 'see grads'}. A NaN or "
            f"Inf in the batch can hide inside a per-sample norm (the penalty's value stays finite while its "
            f"gradient is not), or the penalty's gradient overflowed."
        )
    found = [entry for batch in values.batches for entry in nonfinite_entries(batch)]
    if found:
        lines.append(f"Non-finite values in the batch{where}: {'; '.join(found[:4])}.")
    lines.append(f"The parameters were not updated. {FIX} {off_switch}".strip())
    return " ".join(lines)


def param_names(module: torch.nn.Module, params: Sequence[Tensor]) -> list[str]:
    """The names of ``params`` in ``module`` ("?" for one it does not own); for the error message only."""
    names = {id(p): n for n, p in module.named_parameters()}
    return [names.get(id(p), "?") for p in params]


def values_summary(values: StepValues) -> Iterable[str]:
    for _, v in values.losses:
        yield f"loss {float(v):.4g}"
    for _, name, v in values.values:
        yield f"{name} {float(v):.4g}"


def nonfinite_entries(batch: Any) -> list[str]:
    """``"<path>: samples [i, ...]"`` for every floating tensor of ``batch`` with a NaN or Inf."""
    out: list[str] = []

    def visit(node: Any, path: str) -> None:
        if isinstance(node, Tensor):
            if node.is_floating_point() and node.numel() and not bool(node.isfinite().all()):
                rows = (~node.isfinite()).reshape(node.shape[0], -1).any(dim=1) if node.ndim else node.isnan()
                idx = rows.nonzero().flatten().tolist()[:8] if node.ndim else []
                out.append(f"{path or 'batch'} (shape {list(node.shape)}), samples {idx}")
            return
        if isinstance(node, dict):
            for k, v in node.items():
                visit(v, f"{path}[{k!r}]")
        elif isinstance(node, (tuple, list)):
            for i, v in enumerate(node):
                visit(v, f"{path}[{i}]")

    visit(batch, "batch" if not isinstance(batch, Tensor) else "")
    return out
