"""VirtualAdversarialTraining: its default logits and the error when it finds none (its layer targets and exactness
are in tests/callbacks/test_targets.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from lightning_gp.callbacks import (
    VirtualAdversarialTraining,
)
from tests.callbacks.test_targets import (
    CLASSES,
    MLP,
    MLP_PROBLEM,
    assert_same_training,
    fit,
    quick_fit,
    ref_vat,
    reference,
)


def test_vat_default_logits_on_mlp():
    """Without logits_fn, a layer target calls ``pl_module(batch[0])`` for a tuple batch."""
    expected = reference(MLP_PROBLEM, ref_vat(1.0, 1.0, xi=1e-3))
    _, got = fit(MLP_PROBLEM, [VirtualAdversarialTraining(1.0, xi=1e-3, target="net.2")])
    assert_same_training(got, expected, MLP_PROBLEM, 1e-9)


class SequenceOutput(MLP):
    def forward(self, x):
        return self.net(x).unsqueeze(1).expand(-1, 2, -1)  # (B, T, C): per-token logits


class DictOutput(MLP):
    def forward(self, x):
        return {"scores": self.net(x)}


@pytest.mark.parametrize(("model", "shown"), [(SequenceOutput, r"\(4, 2, 3\)"), (DictOutput, "dict")])
def test_vat_logits_not_found(model, shown):
    data = TensorDataset(torch.randn(8, 5), torch.randint(0, CLASSES, (8,)))
    for target in ("net.2", None):
        with pytest.raises(ValueError, match=rf"needs \(B, C\) logits; `{model.__name__}` gave {shown}.*logits_fn="):
            quick_fit(model(torch.float32), [VirtualAdversarialTraining(0.1, target=target)], data)
