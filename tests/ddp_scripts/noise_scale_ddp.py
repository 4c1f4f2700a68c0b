"""GradientNoiseScale under real 2-process CPU DDP: the two-batch estimate against the one-batch one, and the run
untouched by the monitor's communication hook.

1. θ held fixed (lr = 0), 160 steps of 4 samples per rank: each step logs the one-batch estimate on the combined 8
   samples and the paper's two-batch estimate (each rank's gradient against the all-reduced one). Both are unbiased
   for the same tr Σ and |G|²: rank 0 saves the per-step pairs, the test compares their means.
2. Three steps at lr = 0.5 with and without the monitor: rank 0 saves both final parameter sets (bit-identical).
"""

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from lightning_gp.monitors import GradientNoiseScale
from tests.ddp import close_process_group
from tests.monitors.support import Classifier, dataset

PER_RANK, STEPS = 4, 160


class Shards(pl.LightningDataModule):
    def __init__(self, n):
        super().__init__()
        self.n = n

    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(dataset(self.n, seed=3), range(rank, self.n, world)), batch_size=PER_RANK)


class Every(GradientNoiseScale):
    def __init__(self):
        super().__init__(every_n_steps=1, ema=None)
        self.rows = []

    def _log(self, trainer, metrics, step):
        super()._log(trainer, metrics, step)
        self.rows.append(dict(self.last_logged))


def fit(lr, steps, callbacks):
    pl.seed_everything(0)
    model = Classifier().double()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=lr)
    trainer = pl.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=steps, callbacks=callbacks,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, use_distributed_sampler=False, precision="64-true")
    trainer.fit(model, datamodule=Shards(2 * PER_RANK * steps))
    return trainer, model


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
out = Path(parser.parse_args().out)
torch.set_num_threads(1)
monitor = Every()
trainer, _ = fit(0.0, STEPS, [monitor])
_, with_monitor = fit(0.5, 3, [GradientNoiseScale(every_n_steps=1)])
_, without = fit(0.5, 3, [])
if trainer.is_global_zero:
    torch.save({"rows": monitor.rows, "world_size": trainer.world_size,
                "with": {k: v.clone() for k, v in with_monitor.state_dict().items()},
                "without": {k: v.clone() for k, v in without.state_dict().items()}}, out)
close_process_group()
