"""Critic-step cost of :class:`~lightning_gp.gan.WGANGPMixin` against a hand-written WGAN-GP loop.

    python -m benchmarks.bench_wgan            # full: 30 interleaved repeats per row
    python -m benchmarks.bench_wgan --quick    # a smoke run (a few repeats, noisy)

Targets (issue 4): the mixin's critic step within 1.05× of the same step written by hand, for the
double-backward and the finite-difference gradient penalty; lazy regularization (``reg_every=4``) at most
1.35× an unregularized critic step.

How it is measured: the mixin's step needs a live Trainer (``self.log``, ``manual_backward``), so the
timing runs *inside* one ``training_step`` of a real ``Trainer.fit``: there the mixin's own
``training_step`` (``n_critic`` huge, so only critic steps happen) and the hand-written step are called
round-robin by :func:`benchmarks.harness.interleaved_medians`, warm-up excluded. The hand-written step
uses an identical copy of the critic and generator, plain ``loss.backward()`` and Adam, and the same
functional penalty (:func:`~lightning_gp.functional.wgan_gradient_penalty` /
``wgan_gradient_penalty_fd``). What the mixin adds is its bookkeeping: seeded z/α draws, shape checks,
``self.log`` of four metrics, ``manual_backward``, the ‖∇D‖ tap.

Lazy regularization runs the penalty on one critic step in four, so one *cycle of four* steps is the
timed unit (a median over single steps would just pick an unregularized one), compared with four
``regularizer="none"`` steps. The three configurations share one module and one Trainer (the mixin's
settings are switched between calls), so they too are timed round-robin.
"""

from __future__ import annotations

import argparse
import copy

import lightning as L
import torch
from torch import nn

from benchmarks.harness import Row, format_table, interleaved_medians
from lightning_gp.functional.gan import wgan_gradient_penalty, wgan_gradient_penalty_fd
from lightning_gp.gan import WGANGPMixin

BATCH, DIM, WIDTH, LATENT = 256, 2, 512, 2  # the WGAN-GP paper's toy networks: 3 × 512 ReLU MLPs
N_CRITIC_NEVER = 10**9  # critic steps only


def mlp(n_in: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(n_in, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
        nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, n_out),
    )  # fmt: skip


class HandWritten:
    """The reference: one WGAN-GP critic step as one writes it without any framework."""

    def __init__(self, generator: nn.Module, critic: nn.Module, method: str, gp_weight: float = 10.0) -> None:
        self.generator, self.critic = copy.deepcopy(generator), copy.deepcopy(critic)
        self.opt = torch.optim.Adam(self.critic.parameters(), lr=1e-4, betas=(0.0, 0.9))
        self.method, self.gp_weight = method, gp_weight
        self.params = list(self.critic.parameters())

    def step(self, real: torch.Tensor) -> None:
        n = real.shape[0]
        with torch.no_grad():
            fake = self.generator(torch.randn(n, LATENT))
        loss = self.critic(fake).mean() - self.critic(real).mean()
        self.opt.zero_grad()
        if self.method == "double_backward":
            loss = loss + self.gp_weight * wgan_gradient_penalty(self.critic, real, fake)
            loss.backward()
        else:
            res = wgan_gradient_penalty_fd(self.critic, real, fake, self.params)
            loss.backward()
            for p, g in zip(self.params, res.grads, strict=True):
                p.grad.add_(g, alpha=self.gp_weight)
        self.opt.step()


class BenchGAN(WGANGPMixin, L.LightningModule):
    """A mixin module whose single training step runs the benchmark it is given, then stops."""

    def __init__(self, bench, **kwargs) -> None:
        super().__init__(n_critic=N_CRITIC_NEVER, **kwargs)
        self.generator, self.critic = mlp(LATENT, DIM), mlp(DIM, 1)
        self.bench, self.result = bench, None

    def sample_latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, LATENT, device=self.device)

    def mixin_step(self, batch, **hparams) -> None:
        # The mixin's own training_step; `hparams` switches its configuration in place, so several
        # configurations share one live Trainer and can be timed round-robin.
        self.wgan_hparams.update(hparams)
        WGANGPMixin.training_step(self, batch, 0)

    def training_step(self, batch, batch_idx):
        self.result = self.bench(self, batch)
        self.trainer.should_stop = True


def run_in_trainer(bench, **mixin_kwargs):
    torch.manual_seed(0)
    model = BenchGAN(bench, **mixin_kwargs)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(model, torch.utils.data.DataLoader(torch.randn(BATCH, DIM), batch_size=BATCH))
    return model.result


def bench_method(method: str, warmup: int, repeats: int) -> list[Row]:
    def bench(model, batch):
        hand = HandWritten(model.generator, model.critic, method)
        return interleaved_medians(
            {"hand": lambda: hand.step(batch), "mixin": lambda: model.mixin_step(batch)},
            device=torch.device("cpu"), warmup=warmup, repeats=repeats,
        )  # fmt: skip

    t = run_in_trainer(bench, method=method, gp_weight=10.0)
    return [
        Row(f"hand-written, {method}", t["hand"], t["hand"]),
        Row(f"mixin, {method}", t["mixin"], t["hand"], target=1.05),
    ]


def bench_lazy(warmup: int, repeats: int, reg_every: int = 4) -> list[Row]:
    configs = {
        "none": {"regularizer": "none", "reg_every": 1},
        "lazy": {"regularizer": "gp", "reg_every": reg_every},
        "every": {"regularizer": "gp", "reg_every": 1},
    }

    def bench(model, batch):
        def cycle(hparams):
            def run():
                for _ in range(reg_every):  # exactly one of any reg_every consecutive steps is regularized
                    model.mixin_step(batch, **hparams)

            return run

        return interleaved_medians(
            {name: cycle(hp) for name, hp in configs.items()},
            device=torch.device("cpu"), warmup=warmup, repeats=repeats,
        )  # fmt: skip

    t = run_in_trainer(bench)
    base = t["none"]
    return [
        Row(f"{reg_every} critic steps, regularizer='none'", base, base),
        Row(f"{reg_every} critic steps, gp, reg_every={reg_every}", t["lazy"], base, target=1.35),
        Row(f"{reg_every} critic steps, gp, reg_every=1", t["every"], base),
    ]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repeats: a smoke run, not a measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warmup, repeats = (2, 5) if args.quick else (10, 50)
    rows = bench_method("double_backward", warmup, repeats) + bench_method("finite_difference", warmup, repeats)
    setup = f"critic 3×{WIDTH} ReLU MLP, batch {BATCH}, CPU, {args.threads} thread(s)"
    out = "\n\n".join(
        [
            format_table(f"WGAN-GP critic step: mixin vs hand-written ({setup})", rows),
            format_table(f"Lazy regularization ({setup})", bench_lazy(warmup, max(3, repeats // 2))),
        ]
    )
    print(out)
    return out


if __name__ == "__main__":
    main()
