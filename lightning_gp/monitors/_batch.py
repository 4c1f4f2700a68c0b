"""The targets of a batch for the monitors' default per-sample loss.

The input is found by :func:`lightning_gp.step._batch.resolve_input`, as for the penalty callbacks, so
``input_key`` means the same everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_gp.step._batch import TARGET_KEYS, describe


def select_target(batch: Any) -> Tensor:
    """The targets for the default loss: a tuple/list batch's second element, or a dict's ``"y"``-like key."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2 and isinstance(batch[1], Tensor):
        return batch[1]
    if isinstance(batch, Mapping):
        for name in TARGET_KEYS:
            if isinstance(batch.get(name), Tensor):
                return batch[name]
    raise ValueError(
        f"The default per-sample loss (cross-entropy on an (x, y) batch) finds no targets in the batch "
        f"{describe(batch)}. Pass `loss_fn=lambda outputs, batch: <per-sample losses, shape (B,)>`."
    )


def default_loss(outputs: Tensor, batch: Any) -> Tensor:
    """Per-sample cross-entropy of ``outputs`` (logits) against the batch's integer class labels.

    Floating-point targets (a regression, or soft labels) are refused: cross-entropy against them is not
    what the step trains on, and with one output column it is identically 0 (every norm logged as 0).
    """
    outputs = getattr(outputs, "logits", outputs)  # a Hugging Face model output
    if not isinstance(outputs, Tensor) or outputs.ndim != 2:
        shape = list(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(
            f"The monitors' default per-sample loss is cross-entropy on (B, C) logits, but the model returned "
            f"{shape} (a language model's (B, T, V) logits?). Pass your per-sample loss, e.g. for a causal LM "
            f"`loss_fn=lambda out, batch: F.cross_entropy(out.logits[:, :-1].flatten(0, 1), "
            f"batch['input_ids'][:, 1:].flatten(), reduction='none').view(len(out.logits), -1).mean(1)`."
        )
    target = select_target(batch)
    if target.is_floating_point() or target.is_complex():
        raise ValueError(
            f"The monitors' default per-sample loss is cross-entropy against integer class labels, but the "
            f"batch's targets are {target.dtype} of shape {list(target.shape)} (a regression?; outputs "
            f"{list(outputs.shape)}). Pass your per-sample loss, e.g. `loss_fn=lambda outputs, batch: "
            f"F.mse_loss(outputs, batch[1], reduction='none').flatten(1).mean(1)`."
        )
    return torch.nn.functional.cross_entropy(outputs, target, reduction="none")
