"""The callbacks' settings in a W&B run config: stable, readable keys and values, read back from offline runs."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import AdversarialTraining, DataGradientPenalty, VirtualAdversarialTraining
from tests._lightning.test_wandb_reader import read_run


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def logits_of(module, batch):
    return module(batch[0])


def one_run(save_dir) -> dict:
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(offline=True, save_dir=str(save_dir), project="keys")
    callbacks = [AdversarialTraining(0.1, target="net.0", steps=2), DataGradientPenalty(0.1),
                 DataGradientPenalty(0.1, power=1), VirtualAdversarialTraining(0.5, logits_fn=logits_of)]
    data = TensorDataset(torch.rand(16, 4), torch.randint(0, 3, (16,)))
    pl.Trainer(max_steps=2, callbacks=callbacks, logger=logger, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(Net(), DataLoader(data, batch_size=8))
    logger.experiment.finish()
    return {k: v for k, v in read_run(save_dir).config.items() if k.startswith("lightning_gp/")}


def test_config_keys_and_values_are_the_same_in_two_identical_runs_and_readable(tmp_path):
    first, second = one_run(tmp_path / "a"), one_run(tmp_path / "b")
    assert first == second
    assert set(first) == {"lightning_gp/AdversarialTraining", "lightning_gp/DataGradientPenalty[0]",
                          "lightning_gp/DataGradientPenalty[power=1]", "lightning_gp/VirtualAdversarialTraining"}
    assert first["lightning_gp/AdversarialTraining"]["target"] == "net.0"
    assert first["lightning_gp/VirtualAdversarialTraining"]["logits_fn"] == f"{__name__}.logits_of"
    text = repr(first)
    assert "0x" not in text and "{'target'" not in text  # no address, no dict's text in a key
