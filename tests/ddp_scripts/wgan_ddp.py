"""WGAN-GP mixin under real 2-process CPU DDP with Lightning's default DDP settings.

Trains a few steps on per-rank batches of 4 and records which samples each rank saw (Lightning's
automatic DistributedSampler shuffles training data even for a ``shuffle=False`` loader; the test
replays the combined batches of 8 in one process), counts how often each parameter's gradient is
accumulated (the gradient penalty's ``autograd.grad`` must not fire DDP's accumulate-grad hooks: one
accumulation per backward pass, no more), and gathers the final parameters of both ranks to rank 0,
which saves them to ``--out``.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.distributed as dist

from tests.ddp import close_process_group
from tests.ddp_scripts.wgan_models import IndexedGAN, indexed_loader, trainer_kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--method", default="double_backward")
    parser.add_argument("--regularizer", default="gp")
    # Not used by the tests: `--no-touch` drops the 0·θ term, to show the DDP error it prevents.
    parser.add_argument("--no-touch", action="store_true")
    args = parser.parse_args()
    if args.no_touch:
        IndexedGAN._touch = lambda self, *used: 0

    torch.set_num_threads(1)
    L.seed_everything(0)
    model = IndexedGAN(n_critic=2, lr=1e-2, method=args.method, regularizer=args.regularizer).double()
    init = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    accumulations = {name: 0 for name, _ in model.named_parameters()}

    def counter(name):
        def hook(_param):
            accumulations[name] += 1

        return hook

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(counter(name))

    trainer = L.Trainer(strategy="ddp", devices=2, max_epochs=1, **trainer_kwargs())
    trainer.fit(model, indexed_loader(batch_size=4))

    state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    result = {
        "init": init,
        "params": state,
        "accumulations": accumulations,
        "seen": model.seen,
        "critic_steps": model.critic_steps,
        "generator_steps": model.generator_steps,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    gathered = [None, None]
    dist.all_gather_object(gathered, result)
    if trainer.global_rank == 0:
        torch.save({"ranks": gathered}, args.out)


if __name__ == "__main__":
    main()
    close_process_group()
