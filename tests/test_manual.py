"""lightning_gp.manual: PenaltyMixin and penalized_loss for modules with manual optimization, and the callbacks' pointer
to them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_gp.callbacks import (
    DataGradientPenalty,
    SpectralNormPenalty,
)
from lightning_gp.manual import PenaltyMixin
from tests.callbacks.test_features import fit
from tests.integration.test_exactness import LR, hand_run, make_net
from tests.integration.test_exactness import data_penalty_obj as hand_data_penalty


class ManualModule(PenaltyMixin, pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = make_net()
        self.penalties = [DataGradientPenalty(0.5), SpectralNormPenalty(0.0)]

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.penalized_loss(lambda b: F.cross_entropy(self.net(b[0]), b[1]), batch, self.penalties)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_manual_optimization_helper_matches_hand_written_loop():
    module = ManualModule()
    trainer = fit(module, [], precision="64-true")
    expected = hand_run(lambda n, x, y, t: hand_data_penalty(n, x, y, 0.5))
    for name, value in expected.items():
        torch.testing.assert_close(module.net.state_dict()[name], value, atol=1e-6, rtol=0)
    assert "penalty/data_gradient" in trainer.callback_metrics


def test_callback_on_manual_optimization_module_points_to_the_helper():
    with pytest.raises(RuntimeError, match=r"manual optimization.*penalized_loss"):
        fit(ManualModule(), [DataGradientPenalty(0.5)], precision="64-true")
