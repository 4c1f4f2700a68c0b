"""RobustAccuracy under 2-process CPU DDP: rank 0 saves the logged values and the model it evaluated.

Used by tests/callbacks/test_robust_accuracy.py, which compares them with one process on the same 41 samples
(an odd count: the ranks' shares differ by one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gp import RobustAccuracy
from tests.callbacks.test_robust_accuracy import ATTACKS, QUIET, Net, loaders
from tests.ddp import close_process_group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = Net()
    trainer = pl.Trainer(max_epochs=2, strategy="ddp", devices=2, enable_checkpointing=False,
                         callbacks=[RobustAccuracy(0.1, attacks=ATTACKS, n_samples=41)], **QUIET)
    trainer.fit(model, *loaders())
    if trainer.global_rank == 0:
        torch.save({"metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}, args.out)


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    main()
    close_process_group()
