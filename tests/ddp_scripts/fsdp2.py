"""FSDP2 under 2-process ``ModelParallelStrategy`` (tests/fsdp2_cases.py), in one launch: fit every configuration
(the rank-dependent ones under 2-process DDP too), resume one from Lightning's distributed checkpoint, and record the
refusal of tensor parallelism. Rank 0 saves the gathered parameters, the logged values and the callbacks' state."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.ddp import close_process_group
from tests.fsdp2_cases import CONFIGS, STEPS, VERSUS_DDP, Net, fit, full_state, logged

RESUMED = "sam_fgm_penalty"
NAN_CASES = ("asam_global", "fgm_input", "data_fd_input")  # float inputs: a NaN fits in


def states(trainer) -> dict:
    return {type(cb).__name__: cb.state_dict() for cb in trainer.callbacks if hasattr(cb, "applied")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    results = {}
    for name in args.only if args.only is not None else [*CONFIGS, *VERSUS_DDP]:
        for strategy in ("fsdp2", "ddp") if name in VERSUS_DDP else ("fsdp2",):
            trainer, model = fit(name, strategy=strategy)
            results[(name, strategy)] = {"params": full_state(model), "metrics": logged(trainer)}
    # a distributed checkpoint (a directory of shards) after STEPS steps, resumed to 2·STEPS
    root = Path(args.out).parent / "fsdp2_ckpt"
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=STEPS, save_top_k=-1)
    fit(RESUMED, strategy="fsdp2", callbacks=[saver], enable_checkpointing=True)
    trainer, model = fit(RESUMED, strategy="fsdp2", max_steps=2 * STEPS, ckpt_path=saver.best_model_path or
                         str(next(root.glob("*.ckpt"))))
    results["resumed"] = {"params": full_state(model), "states": states(trainer)}
    trainer, model = fit(RESUMED, strategy="fsdp2", max_steps=2 * STEPS)
    results["uninterrupted"] = {"params": full_state(model), "states": states(trainer)}
    # a NaN on rank 1 only: every rank raises (one that did not would hang the next case), no update is taken
    nan = {}
    for name in NAN_CASES:
        model = Net(CONFIGS[name][0])
        try:
            fit(name, strategy="fsdp2", nan=True, model=model)
            nan[name] = {"error": None}
        except FloatingPointError as err:
            nan[name] = {"error": str(err)}
        nan[name]["finite"] = all(bool(v.isfinite().all()) for v in full_state(model).values())
    rank = torch.distributed.get_rank()
    torch.save(nan, f"{args.out}.nan.rank{rank}")
    try:
        fit("fgm_input", strategy="tp2")
        results["tp2"] = None
    except RuntimeError as err:
        results["tp2"] = str(err)
    if rank == 0:
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
    close_process_group()
