"""2-process CPU DDP run of the three monitors with a CSVLogger and an offline WandbLogger.

Each rank trains on 4 samples per step, rank r on samples r, r+2, ... in order (its own loader, not
Lightning's shuffling DistributedSampler), so the two ranks together see the same 8 samples per step as
one process with batch size 8 and no shuffling.
A fourth monitor, GradientNormMonitor(mode="fused"), logs at step 2 only (each rank reads its own 4 samples'
norms off its own backward; the per-sample factor is the local batch size). GradientNoiseScale logs at step 3: the
ranks' per-sample norms and the all-reduced gradient give the estimate on the combined batch.
Rank 0 saves the initial weights and where the loggers wrote; tests/integration/test_ddp_monitors.py compares the
logged values with a one-process run on the combined batches.
"""

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch.utils.data import DataLoader, Subset

from lightning_gp.monitors import GradientNoiseScale, GradientNormMonitor, MLPInequalityMonitor, SpectralNormMonitor
from tests.ddp import close_process_group
from tests.monitors.support import Classifier, dataset


class Shards(pl.LightningDataModule):
    def train_dataloader(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(Subset(dataset(32), range(rank, 32, world)), batch_size=4, shuffle=False)


parser = argparse.ArgumentParser()
parser.add_argument("--out", required=True)
out = Path(parser.parse_args().out)
root = out.parent / "ddp_run"

torch.set_num_threads(1)
pl.seed_everything(0)
model = Classifier()
initial = {k: v.clone() for k, v in model.state_dict().items()}
monitors = [GradientNormMonitor(per_layer=True, every_n_steps=2, media_every_n_steps=2),
            MLPInequalityMonitor(every_n_steps=2, max_samples=4, media_every_n_steps=2),
            SpectralNormMonitor(every_n_steps=2),
            # fused mode at other steps (every 3rd: logger step 2), so its keys do not collide in the logs
            GradientNormMonitor(per_layer=True, every_n_steps=3, histograms=False, mode="fused"),
            GradientNoiseScale(every_n_steps=4, ema=0.9)]
wandb_logger = WandbLogger(offline=True, save_dir=str(root), project="monitors-ddp")
trainer = pl.Trainer(
    strategy="ddp", accelerator="cpu", devices=2, max_steps=4, log_every_n_steps=1, default_root_dir=root,
    callbacks=monitors, logger=[CSVLogger(root), wandb_logger], enable_progress_bar=False,
    enable_model_summary=False, enable_checkpointing=False, use_distributed_sampler=False,
)
trainer.fit(model, datamodule=Shards())
if trainer.is_global_zero:
    wandb_logger.experiment.finish()
    torch.save({"initial": initial, "root": str(root), "world_size": trainer.world_size,
                "last_logged": [m.last_logged for m in monitors]}, out)
close_process_group()
