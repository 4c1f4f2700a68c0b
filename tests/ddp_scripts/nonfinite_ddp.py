"""Non-finite values on ONE rank under real 2-process CPU DDP: every rank must raise, none may hang.

Each case trains 3 steps with a NaN (or a NaN gradient) on rank 1 only, at step 1. Each rank catches the
``FloatingPointError`` of its ``fit`` and records the message, the step it stopped at and whether its
parameters are still finite; the next case runs in the same process group (a rank that had not raised
would be waiting in a collective, and the next case would hang). Rank r writes ``<out>.rank<r>``.
A 60 s process-group timeout turns a hang into an error instead of a blocked CI job.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gp.callbacks import AdversarialTraining, DataGradientPenalty, ParameterGradientPenalty
from lightning_gp.gan import WGANGPMixin
from tests.ddp import close_process_group
from tests.integration.test_ddp_callbacks import _RankSampler

PER_RANK = 4
NAN_INDEX = 11  # rank 1's second batch (rank r gets samples r, r + 2, ...)


class Net(pl.LightningModule):
    def __init__(self, fault: str = "") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        self.fault = fault

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.global_rank == 1 and self.global_step == 1:
            w = self.net[0].weight
            if self.fault == "nan_gradient":  # value 0, gradient NaN (torch.where's masked branch)
                loss = loss + torch.where(torch.zeros((), dtype=torch.bool), (-w.abs() - 1).sqrt(), 0).sum()
            elif self.fault == "nan_constant":  # a NaN loss on rank 1 whose gradients stay finite
                loss = loss + torch.tensor(float("nan"))
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class GAN(WGANGPMixin, pl.LightningModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        torch.manual_seed(0)
        self.generator, self.critic = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)

    def sample_latent(self, n):
        return torch.randn(n, 3, device=self.device)


def data(with_nan: bool) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * PER_RANK * 3, 4, generator=gen)
    if with_nan:
        x[NAN_INDEX, 2] = float("nan")
    return TensorDataset(x, torch.randint(0, 3, (len(x),), generator=gen))


CASES = {
    "data_center": (lambda: Net(), lambda: [DataGradientPenalty(1.0, center=1.0)], True),
    "adversarial": (lambda: Net(), lambda: [AdversarialTraining(0.1)], True),
    "nan_gradient": (lambda: Net("nan_gradient"), lambda: [DataGradientPenalty(0.5)], False),
    "nan_constant": (lambda: Net("nan_constant"), lambda: [ParameterGradientPenalty(0.1)], False),
    "wgan": (lambda: GAN(n_critic=2, lr=1e-2), lambda: [], True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    rank = 0
    for name, (make_module, make_callbacks, with_nan) in CASES.items():
        module = make_module()
        trainer = pl.Trainer(max_steps=6 if name == "wgan" else 3, accelerator="cpu", devices=2,
                             strategy=DDPStrategy(timeout=timedelta(seconds=60)), callbacks=make_callbacks(),
                             use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        ds = data(with_nan)
        loader = DataLoader(ds, batch_size=PER_RANK, sampler=_RankSampler(len(ds)))
        if name == "wgan":
            loader = DataLoader(ds.tensors[0], batch_size=PER_RANK, sampler=_RankSampler(len(ds)))
        try:
            trainer.fit(module, loader)
            error = None
        except FloatingPointError as err:
            error = str(err)
        rank = trainer.global_rank
        results[name] = {
            "error": error,
            "global_step": trainer.global_step,
            "finite": all(bool(p.isfinite().all()) for p in module.parameters()),
            "wrapped": "training_step" in module.__dict__,
        }
    torch.save(results, f"{args.out}.rank{rank}")
    if rank == 0:
        torch.save({"done": True}, args.out)


if __name__ == "__main__":
    main()
    close_process_group()
