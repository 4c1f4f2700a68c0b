"""Extra passes leave no trace on the user's module: a step that updates a metric, a counter, a buffer and a
list ends with the values of a plain run (no callback), under every callback that runs ``training_step`` again."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    GradientNormMonitor,
    ParameterGradientPenalty,
    SpectralNormPenalty,
    VirtualAdversarialTraining,
)

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Counting(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
        self.seen = torchmetrics.SumMetric()
        self.accuracy = torchmetrics.classification.MulticlassAccuracy(num_classes=3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.steps = 0
        self.sizes: list[int] = []
        self.by_step: dict[int, int] = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.seen.update(torch.tensor(float(len(y))))
        self.accuracy.update(logits.detach(), y)
        self.log("seen", self.seen, on_step=False, on_epoch=True)
        self.calls += 1
        self.steps += 1
        self.sizes.append(len(y))
        self.by_step[batch_idx] = len(y)
        return F.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data():
    g = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(32, 4, generator=g), torch.randint(0, 3, (32,), generator=g)),
                      batch_size=8)


def traces(module: Counting) -> dict:
    return {"seen": float(module.seen.compute()), "updates": module.seen.update_count,
            "accuracy_updates": module.accuracy.update_count, "calls": int(module.calls), "steps": module.steps,
            "sizes": list(module.sizes), "by_step": dict(module.by_step),
            "bn_batches": int(module.net[1].num_batches_tracked)}


CALLBACKS = {
    "data_double_backward": lambda: [DataGradientPenalty(0.1, method="double_backward")],
    "data_finite_difference": lambda: [DataGradientPenalty(0.1, method="finite_difference")],
    "fgsm": lambda: [AdversarialTraining(0.1)],
    "pgd": lambda: [AdversarialTraining(0.1, steps=3, random_start=True, adversarial_weight=0.5)],
    "freelb": lambda: [AdversarialTraining(0.1, steps=3, average_steps=True)],
    "vat": lambda: [VirtualAdversarialTraining(0.5)],
    "parameter_finite_difference": lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
    "parameter_double_backward": lambda: [ParameterGradientPenalty(0.1, method="double_backward")],
    "flooding": lambda: [Flooding(0.5)],
    "spectral": lambda: [SpectralNormPenalty(0.1)],
    "all": lambda: [AdversarialTraining(0.1, steps=2), DataGradientPenalty(0.1, method="finite_difference"),
                    ParameterGradientPenalty(0.1, method="finite_difference"), VirtualAdversarialTraining(0.5)],
    "recompute_monitor": lambda: [GradientNormMonitor(every_n_steps=1)],
}


@pytest.fixture(scope="module")
def plain():
    module = Counting()
    trainer = pl.Trainer(max_epochs=1, **QUIET)
    trainer.fit(module, data())
    return traces(module), float(trainer.callback_metrics["seen"])


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_the_step_s_side_effects_happen_once(name, plain):
    module = Counting()
    trainer = pl.Trainer(max_epochs=1, callbacks=CALLBACKS[name](), **QUIET)
    trainer.fit(module, data())
    expected, seen = plain
    assert traces(module) == expected
    assert float(trainer.callback_metrics["seen"]) == seen == 32.0
