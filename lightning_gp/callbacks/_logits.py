"""The logits of a batch, for the callbacks whose terms compare class distributions (VAT, TRADES).

``logits_fn(pl_module, batch)`` where the user gave one; else ``pl_module(input)``: the batch input the site
perturbs, or, when the perturbation sits on a layer, the model's own input (a token model's ``input_ids`` first).
A Hugging Face output's ``.logits`` is taken. The caller decides how the pass is isolated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from lightning_gp._lightning.setup_checks import check_forward
from lightning_gp.functional._checks import check_callable
from lightning_gp.step._batch import DEFAULT_KEYS, InputKey, resolve_input, value_at
from lightning_gp.step._site import Probe

#: What ``pl_module(...)`` is called on when the perturbation sits on a layer: a token model's ids first.
MODEL_INPUT_KEYS = ("input_ids", *DEFAULT_KEYS)
#: ``logits_fn(pl_module, batch)`` → logits (B, C).
LogitsFn = Callable[[Any, Any], Tensor]


def batch_logits(module: nn.Module, probe: Probe, batch: Any, logits_fn: LogitsFn | None, input_key: InputKey,
                 owner: str) -> Tensor:
    """The (B, C) logits of ``batch``, or a clear error naming ``logits_fn`` as the fix."""
    if logits_fn is not None:
        logits = logits_fn(module, batch)
    elif probe.module is None:
        logits = module(value_at(batch, probe.path))
    else:
        logits = module(resolve_input(batch, input_key, owner, computed=True, default_keys=MODEL_INPUT_KEYS,
                                      whole_batch=True)[0])
    logits = getattr(logits, "logits", logits)  # Hugging Face model outputs
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"{owner} needs (B, C) logits; `{type(module).__name__}` gave {shape}. Pass "
            f"`logits_fn=lambda module, batch: ...` returning the logits of the batch."
        )
    return logits


def check_logits_source(module: Any, logits_fn: LogitsFn | None, owner: str) -> None:
    """``logits_fn`` is a callable, or (given a ``module``, at setup) the module defines ``forward``: else a clear error
    that names the fix."""
    if logits_fn is not None:
        check_callable(logits_fn, "logits_fn", "callable (pl_module, batch) -> logits", owner)
    elif module is not None:
        check_forward(module, owner, "Define `forward` returning the logits, or pass "
                                     "`logits_fn=lambda module, batch: ...`.")
