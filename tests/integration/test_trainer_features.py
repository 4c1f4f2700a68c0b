"""Trainer features and usage patterns that the callbacks support or refuse in `setup` with what to do."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
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
    penalized_loss,
)

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
ALL = {
    "data": lambda: DataGradientPenalty(0.1),
    "parameter": lambda: ParameterGradientPenalty(0.1),
    "spectral": lambda: SpectralNormPenalty(0.1),
    "flooding": lambda: Flooding(0.1),
    "adversarial": lambda: AdversarialTraining(0.1),
    "vat": lambda: VirtualAdversarialTraining(0.1),
    "monitor": lambda: GradientNormMonitor(every_n_steps=1),
}


def data(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))


class Net(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class IteratorStep(Net):
    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)
        return F.cross_entropy(self(batch[0]), batch[1])


@pytest.mark.parametrize("name", list(ALL))
def test_iterator_steps_are_refused_in_setup_with_what_to_do(name):
    trainer = pl.Trainer(max_steps=2, callbacks=[ALL[name]()], **QUIET)
    with pytest.raises(RuntimeError, match=r"training_step\(self, dataloader_iter\)` draws its own batches.*"
                                           r"training_step\(self, batch, batch_idx\)`.*penalized_loss"):
        trainer.fit(IteratorStep(), DataLoader(data(), batch_size=8))


def test_penalized_loss_inside_an_iterator_step_is_the_way_in():
    class Manual(IteratorStep):
        def __init__(self):
            super().__init__()
            self.penalty = DataGradientPenalty(0.1)

        def training_step(self, dataloader_iter):
            batch, _, _ = next(dataloader_iter)
            return penalized_loss(self, lambda b: F.cross_entropy(self(b[0]), b[1]), batch, [self.penalty])

    module = Manual()
    pl.Trainer(max_steps=3, **QUIET).fit(module, DataLoader(data(), batch_size=8))
    assert module.penalty.applied == 3


def test_two_train_loaders_name_the_input_s_full_path():
    class Two(Net):
        def training_step(self, batch, batch_idx):
            return sum(F.cross_entropy(self(b[0]), b[1]) for b in batch)

    loaders = [DataLoader(data(), batch_size=8), DataLoader(data(), batch_size=8)]
    with pytest.raises(ValueError, match=r"several loaders' batches.*input_key=lambda batch: batch\[0\]\[0\]"):
        pl.Trainer(max_steps=1, callbacks=[DataGradientPenalty(0.1)], **QUIET).fit(Two(), loaders)
    # and with the path given, it trains
    pl.Trainer(max_steps=2, callbacks=[AdversarialTraining(0.1, input_key=lambda b: b[0][0])], **QUIET).fit(
        Two(), loaders)


@pytest.mark.parametrize("name", list(ALL))
def test_barebones_gets_no_warning_from_the_package(name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.Trainer(max_steps=3, barebones=True, callbacks=[ALL[name]()]).fit(Net(), DataLoader(data(), batch_size=8))
    ours = [w for w in caught if "lightning_gp" in w.filename or "self.log" in str(w.message)]
    assert not ours, [str(w.message) for w in ours]


def test_the_epoch_buffer_of_penalized_loss_stays_bounded():
    """Manual optimization runs no epoch hook of the callback: the per-epoch record is a running sum, not a
    list that grew by one tensor a step."""

    class Manual(Net):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.penalty = DataGradientPenalty(0.1)

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = penalized_loss(self, lambda b: F.cross_entropy(self(b[0]), b[1]), batch, [self.penalty])
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    module = Manual()
    pl.Trainer(max_steps=20, **QUIET).fit(module, DataLoader(data(), batch_size=2))
    total, count = module.penalty._epoch._values["penalty/data_gradient"]
    assert total.numel() == 1 and count == 2 * 4  # one scalar, for the 4 steps of the second epoch so far
