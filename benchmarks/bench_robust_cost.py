"""What robust validation costs: one ``RobustAccuracy`` evaluation against one epoch of adversarial training.

The issue's setting: ``RobustAccuracy(every_n_epochs=5, n_samples=1000)`` beside PGD-10 adversarial training. The
model is ``bench_autoattack``'s digits CNN, first trained with PGD-7 for a few epochs (so that robust accuracy, which
decides how many samples the later attacks still run on, is what a robust model gives). Then, through Lightning in
this process:

- one epoch of ``AdversarialTraining(0.1, norm="linf", steps=10, step_size=0.025, random_start=True)`` on
  ``--train-size`` samples (the training digits repeated; 50 000 by default, CIFAR-10's size), timed from
  ``on_train_epoch_start`` to ``on_train_epoch_end``;
- ``trainer.validate`` with ``RobustAccuracy(0.1, attacks=..., n_samples=1000)`` on 1000 held-out digits, for the
  "standard" and the "fast" suite, less ``trainer.validate`` without it (the clean validation pass).

Reported: both times, and the evaluation's cost per training epoch at ``every_n_epochs=5`` (evaluation ÷ (5 × epoch)).
The fraction scales with the training set: it is ``n_samples / (5 × train size)`` times the ratio of an AutoAttack
sample's cost to a PGD-10 training sample's.

Run from the repository root::

    python -m benchmarks.bench_robust_cost                  # about 3 minutes on 2 CPU threads
    python -m benchmarks.bench_robust_cost --train-size 10000 --suites fast
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_autoattack import DigitsCNN, digits, train
from benchmarks.harness import load_note
from lightning_gp import AdversarialTraining, RobustAccuracy


class Classifier(L.LightningModule):
    """An ordinary classifier around the digits CNN."""

    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.log("val/loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(Callback):
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.began = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seconds = time.perf_counter() - self.began


def trainer(callbacks: list[Callback], **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-size", type=int, default=50_000)
    parser.add_argument("--samples", type=int, default=1000, help="RobustAccuracy(n_samples=...)")
    parser.add_argument("--every-n-epochs", type=int, default=5)
    parser.add_argument("--warmup-epochs", type=int, default=5)
    parser.add_argument("--suites", nargs="+", choices=["standard", "fast"], default=["standard", "fast"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x_val, y_val = digits(args.samples)
    module = Classifier(train(x_tr, y_tr, args.warmup_epochs))
    repeat = -(-args.train_size // len(x_tr))
    train_set = TensorDataset(x_tr.repeat(repeat, 1, 1, 1)[: args.train_size], y_tr.repeat(repeat)[: args.train_size])
    val_loader = DataLoader(TensorDataset(x_val, y_val), batch_size=500)

    timer = EpochTimer()
    pgd10 = AdversarialTraining(0.1, norm="linf", steps=10, step_size=0.025, random_start=True, clamp=(0.0, 1.0))
    trainer([pgd10, timer], max_epochs=1, limit_val_batches=0).fit(
        module, DataLoader(train_set, batch_size=128, shuffle=True))
    epoch = timer.seconds

    began = time.perf_counter()
    trainer([]).validate(module, val_loader, verbose=False)
    clean_pass = time.perf_counter() - began
    rows = []
    for suite in args.suites:
        cb = RobustAccuracy(0.1, norm="linf", attacks=suite, n_samples=args.samples)
        began = time.perf_counter()
        trainer([cb]).validate(module, val_loader, verbose=False)
        seconds = time.perf_counter() - began - clean_pass
        rows.append((suite, cb.history[-1]["robust/accuracy"], seconds))

    lines = [f"Digits CNN after {args.warmup_epochs} PGD-7 epochs; one PGD-10 training epoch on {args.train_size} "
             f"samples (batch 128): {epoch:.1f} s; CPU {torch.get_num_threads()} threads; {load_note(args.threads)}",
             "", f"| suite | robust acc. | evaluation of {args.samples} samples | ÷ one training epoch | cost per "
             f"epoch at every_n_epochs={args.every_n_epochs} |", "|---|---:|---:|---:|---:|"]
    for suite, robust, seconds in rows:
        lines.append(f"| {suite} | {robust:.1%} | {seconds:.1f} s | {seconds / epoch:.2f} | "
                     f"{seconds / (args.every_n_epochs * epoch):.1%} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
