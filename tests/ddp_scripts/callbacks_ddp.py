"""Train several callback configurations under real 2-process CPU DDP in one launch; save final params.

Used by tests/integration/test_ddp_callbacks.py, which compares them to one process on the combined batch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gp.step._seed import RunSeed
from tests.ddp import close_process_group
from tests.integration.test_ddp_callbacks import CONFIGS, PER_RANK_BATCH, fit


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    trainer = None
    for name in CONFIGS:
        trainer, model = fit(name, batch_size=PER_RANK_BATCH, strategy="ddp", devices=2)
        results[name] = {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "metrics": {k: v.detach().clone() for k, v in trainer.callback_metrics.items()},
        }
    # The one seeding policy: each rank's process seeded otherwise, the run's seed is still rank 0's on every rank.
    torch.manual_seed(100 + trainer.global_rank)
    seed = RunSeed()
    seed.setup(trainer.strategy)
    seeds = trainer.strategy.all_gather(torch.tensor([seed.base, torch.initial_seed()]))
    if trainer is not None and trainer.global_rank == 0:
        torch.save({**results, "run_seed": seeds}, args.out)


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    main()
    close_process_group()
