"""FGM and VAT with an embedding target on a Hugging Face BERT under real 2-process CPU DDP (default
settings, Lightning's DistributedSampler); saves the final parameters, the sample indices each rank saw per
step, and each rank's initial seed. Used by tests/callbacks/test_targets_hf.py::test_ddp_matches_one_process."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.callbacks.test_targets_hf import DDP_CONFIGS, ddp_fit
from tests.ddp import close_process_group


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = {}
    trainer = None
    for name in DDP_CONFIGS:
        trainer, model = ddp_fit(name)
        seen = [None, None]
        torch.distributed.all_gather_object(seen, [s.tolist() for s in model.seen])
        seeds = [None, None]
        torch.distributed.all_gather_object(seeds, torch.initial_seed())
        results[name] = {
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "seen": [[torch.tensor(b) for b in rank] for rank in seen],
            "initial_seed": seeds,
        }
    if trainer is not None and trainer.global_rank == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    pl.seed_everything(0, verbose=False)
    main()
    close_process_group()
