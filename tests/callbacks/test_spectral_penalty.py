"""SpectralNormPenalty: a model without the layers it reads, and a checkpoint with NaN vectors."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_gp import (
    SpectralNormPenalty,
)
from tests.integration.test_fuzz_lightning import EVERY_CALLBACK, fit


class ParameterFree(pl.LightningModule):
    """A model with one trainable scale the loss uses, no Linear/Conv layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x[:, :3] * self.scale

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_model_without_layers():
    for name in ("data", "parameter", "adversarial", "vat", "flooding"):
        module = ParameterFree()
        fit(module, EVERY_CALLBACK[name]())
        assert bool(module.scale.isfinite())
    with pytest.raises(ValueError, match="Linear"):
        fit(ParameterFree(), [SpectralNormPenalty(0.1)])


def test_a_checkpoint_with_nan_vectors_is_refused_on_load_naming_the_key():
    callback = SpectralNormPenalty(0.1)
    state = {"applied": 3, "vectors": {"net.0": torch.tensor([float("nan"), 1.0]), "net.2": torch.ones(2)}}
    with pytest.raises(ValueError, match=r"`vectors\['net.0'\]` holds NaN/Inf"):
        callback.load_state_dict(state)
    assert callback.applied == 0 and callback.vectors == {}  # nothing half-loaded
