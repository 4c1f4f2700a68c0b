"""WGAN-GP on the paper's 2-D toy sets (8 Gaussians, 25 Gaussians, Swiss roll), with mode metrics.

Run (LightningCLI; W&B offline by default, ``WANDB_MODE=online`` to sync)::

    python -m examples.wgan_gp_toy fit --model.dataset=25gaussians     # ~4.5 min on one core: 25/25 modes, ~91 % HQ
    python -m examples.wgan_gp_toy fit --model.dataset=8gaussians --model.regularizer=r1
    python -m examples.wgan_gp_toy fit --print_config      # every option

During training, every ``eval_every`` generator steps, 2,500 samples of an exponential moving average
(EMA) of the generator are scored: ``toy/modes_captured``, ``toy/high_quality`` (PacGAN's definitions,
see ``examples/_toy_data.py``) and ``toy/w1`` (exact Wasserstein-1 between 500 generated and 500 real
samples; ``toy/w1_floor`` is what a perfect generator scores with that sample size). At the end it saves
``samples.png`` (generated samples over the real density), ``critic.png`` (critic contours with its
gradient field, which WGAN-GP pushes towards unit norm between the two distributions) and ``curves.png``
(the metrics over training) to ``out_dir`` and logs them as ``wandb.Image``; ``metrics.csv`` holds the
metric curve.

Why an EMA generator: WGAN training keeps the generator moving (the critic is re-fitted after each of its
steps), so single iterates drift between modes; an average of recent weights is a far more stable sample
(Yazıcı et al. 2019). The learning rate decays linearly to zero over the run for the same reason.
"""

from __future__ import annotations

import copy
import csv
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gp.gan import WGANGPMixin

try:
    from examples._toy_data import (
        DATASETS,
        ToyStream,
        density_grid,
        mode_coverage,
        mode_spec,
        sample,
        wasserstein1,
        wasserstein1_floor,
    )
except ImportError:  # run as a file: python examples/wgan_gp_toy.py
    from _toy_data import (  # type: ignore[no-redef]
        DATASETS,
        ToyStream,
        density_grid,
        mode_coverage,
        mode_spec,
        sample,
        wasserstein1,
        wasserstein1_floor,
    )

EVAL_SAMPLES = 2500  # PacGAN's count
W1_SAMPLES = 500  # the assignment problem is O(n³): 500 points cost ~0.1 s, 1000 points ~1 s


def mlp(n_in: int, n_out: int, width: int, depth: int) -> nn.Sequential:
    """``depth`` hidden ReLU layers of ``width`` units (the WGAN-GP toy code uses 3 × 512)."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, n_out))


class ToyWGAN(WGANGPMixin, L.LightningModule):
    """A generator and a critic, both MLPs, on a 2-D toy set.

    Args:
        dataset: one of ``"8gaussians"``, ``"25gaussians"``, ``"swissroll"``.
        latent_dim: dimension of the Gaussian latent.
        width, depth: hidden units and hidden layers of both MLPs.
        batch_size: real (and fake) samples per critic step.
        max_generator_steps: length of the run, in generator updates (sets the linear lr decay).
        ema_decay: EMA of generator weights used for evaluation and figures (0 = the raw generator).
        lr_decay: decay both learning rates linearly to 0 over ``max_generator_steps``.
        eval_every: generator steps between evaluations.
        out_dir: where PNGs and ``metrics.csv`` go.
        seed: seed of the real-data stream.
        n_critic, regularizer, gp_weight, clip_value, reg_every, lr, betas, method: the mixin's
            options. The defaults here are tuned for the toy sets (λ = 0.1, as in the paper's own toy
            code, Adam 1e-3, β = (0.5, 0.9)); the paper's image defaults are λ = 10, 1e-4, (0, 0.9).
    """

    def __init__(
        self,
        dataset: str = "25gaussians",
        latent_dim: int = 2,
        width: int = 128,
        depth: int = 3,
        batch_size: int = 256,
        max_generator_steps: int = 12000,
        ema_decay: float = 0.999,
        lr_decay: bool = True,
        eval_every: int = 250,
        out_dir: str = "outputs/wgan_toy",
        seed: int = 0,
        n_critic: int = 5,
        regularizer: str = "gp",
        gp_weight: float = 0.1,
        clip_value: float = 0.01,
        reg_every: int = 1,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.5, 0.9),
        method: str = "double_backward",
    ) -> None:
        if dataset not in DATASETS:
            raise ValueError(f"`dataset` must be one of {DATASETS}, got {dataset!r}.")
        super().__init__(
            n_critic=n_critic,
            regularizer=regularizer,
            gp_weight=gp_weight,
            clip_value=clip_value,
            reg_every=reg_every,
            lr=lr,
            betas=betas,
            method=method,
        )
        self.save_hyperparameters()
        self.generator = mlp(latent_dim, 2, width, depth)
        self.critic = mlp(2, 1, width, depth)
        # Not a submodule: the EMA is evaluation state, not trained, and stays out of DDP and optimizers.
        self._ema = [copy.deepcopy(self.generator).requires_grad_(False)]
        self.spec = mode_spec(dataset)
        self.eval_z = torch.randn(EVAL_SAMPLES, latent_dim, generator=torch.Generator().manual_seed(seed + 1))
        self.w1_real = sample(dataset, W1_SAMPLES, torch.Generator().manual_seed(seed + 2))
        self.history: list[dict[str, float]] = []
        self._last_generator_step = 0

    @property
    def ema_generator(self) -> nn.Module:
        return self._ema[0]

    def sample_latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def train_dataloader(self) -> DataLoader:
        seed = self.hparams.seed + 1000 * self.global_rank
        return DataLoader(ToyStream(self.hparams.dataset, self.hparams.batch_size, seed), batch_size=None)

    def configure_optimizers(self):
        hp = self.hparams
        opt_g = torch.optim.Adam(self.generator.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        opt_c = torch.optim.Adam(self.critic.parameters(), lr=hp.lr, betas=tuple(hp.betas))
        if not hp.lr_decay:
            return opt_g, opt_c
        # Stepped by hand after each generator update (manual optimization never steps schedulers).
        self._schedulers = [
            torch.optim.lr_scheduler.LambdaLR(o, lambda s: max(0.0, 1 - s / hp.max_generator_steps))
            for o in (opt_g, opt_c)
        ]
        return opt_g, opt_c

    # -- the bits around the mixin's loop: EMA, lr decay, evaluation --------------------------------

    def on_fit_start(self) -> None:
        self.ema_generator.to(self.device).load_state_dict(self.generator.state_dict())
        self.w1_floor = wasserstein1_floor(self.hparams.dataset, W1_SAMPLES)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        done = self.generator_steps  # counted by the mixin
        if done == self._last_generator_step:
            return
        self._last_generator_step = done
        with torch.no_grad():
            decay = self.hparams.ema_decay
            for p_ema, p in zip(self.ema_generator.parameters(), self.generator.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        for sched in getattr(self, "_schedulers", []):
            sched.step()
        if done % self.hparams.eval_every == 0 or done >= self.hparams.max_generator_steps:
            self.evaluate(done)
        if done >= self.hparams.max_generator_steps:
            self.trainer.should_stop = True

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, float]:
        fake = self.ema_generator(self.eval_z.to(self.device)).cpu()
        row: dict[str, float] = {"generator_step": step}
        if self.spec is not None:
            cov = mode_coverage(fake, self.spec)
            row["modes_captured"] = cov.modes_captured
            row["high_quality"] = cov.high_quality
        row["w1"] = wasserstein1(fake[:W1_SAMPLES], self.w1_real)
        row["w1_floor"] = self.w1_floor
        self.history.append(row)
        self.print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
        self.log_dict({f"toy/{k}": float(v) for k, v in row.items() if k != "generator_step"}, rank_zero_only=True)
        return row

    # -- figures ------------------------------------------------------------------------------------

    def on_fit_end(self) -> None:
        if self.global_rank != 0:
            return
        out = Path(self.hparams.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.history:
            with open(out / "metrics.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(self.history[-1]))
                writer.writeheader()
                writer.writerows(self.history)
        paths = save_figures(self, out)
        if isinstance(self.logger, WandbLogger):
            captions = ["samples", "critic", "curves"][: len(paths)]
            self.logger.log_image("toy/figures", [str(p) for p in paths], caption=captions)


def save_figures(model: ToyWGAN, out: Path) -> list[Path]:
    """``samples.png`` (EMA generator over the real density), ``critic.png`` (contours + ∇D) and
    ``curves.png`` (the metrics over training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = model.hparams.dataset
    lim = 5.0 if name == "25gaussians" else 2.5
    gx, gy, dens = density_grid(name, lim)
    with torch.no_grad():
        fake = model.ema_generator(model.eval_z.to(model.device)).cpu().numpy()

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contourf(gx, gy, dens, levels=20, cmap="Greys")
    ax.scatter(fake[:, 0], fake[:, 1], s=2, c="tab:orange", alpha=0.6, label="generated (EMA)")
    title = name
    if model.history and "modes_captured" in model.history[-1]:
        h = model.history[-1]
        title += f": {h['modes_captured']}/{model.spec.means.shape[0]} modes, {100 * h['high_quality']:.1f} % HQ"
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=title)
    ax.legend(loc="upper right", markerscale=4)
    samples_png = out / "samples.png"
    fig.savefig(samples_png, dpi=120, bbox_inches="tight")
    plt.close(fig)

    # Critic values and input gradients on a grid: the gradient field shows where WGAN-GP's unit-norm
    # constraint holds (between real and fake mass) and where the critic is free (far from both).
    steps = 100
    xs = torch.linspace(-lim, lim, steps)
    grid = torch.cartesian_prod(xs, xs)[:, [1, 0]].to(model.device).requires_grad_(True)
    with torch.enable_grad():
        values = model.critic(grid).reshape(-1)
        (grad,) = torch.autograd.grad(values.sum(), grid)
    values = values.detach().cpu().reshape(steps, steps).numpy()
    grad = grad.cpu().reshape(steps, steps, 2).numpy()
    fig, ax = plt.subplots(figsize=(5.6, 5))
    cs = ax.contourf(xs.numpy(), xs.numpy(), values, levels=30, cmap="coolwarm")
    fig.colorbar(cs, ax=ax, label="D(x)")
    k = 6  # every 6th grid point keeps the arrows readable
    ax.quiver(xs[::k].numpy(), xs[::k].numpy(), grad[::k, ::k, 0], grad[::k, ::k, 1], color="k", alpha=0.7)
    ax.scatter(fake[:500, 0], fake[:500, 1], s=1, c="tab:orange")
    ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", title=f"critic and ∇D, {name}")
    critic_png = out / "critic.png"
    fig.savefig(critic_png, dpi=120, bbox_inches="tight")
    plt.close(fig)
    paths = [samples_png, critic_png]

    # The metric curves: a single final checkpoint can be lucky, the curve shows whether it is stable.
    if len(model.history) > 1:
        steps_done = [h["generator_step"] for h in model.history]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if "modes_captured" in model.history[-1]:
            ax.plot(steps_done, [h["modes_captured"] for h in model.history], "o-", label="modes captured")
            ax.set_ylabel("modes")
            ax2 = ax.twinx()
            ax2.plot(steps_done, [100 * h["high_quality"] for h in model.history], "s-", c="tab:orange")
            ax2.set(ylabel="% high quality (orange)", ylim=(0, 100))
        else:
            ax.plot(steps_done, [h["w1"] for h in model.history], "o-", label="W1 estimate")
            ax.axhline(model.w1_floor, ls="--", c="gray", label="W1 of a perfect generator")
            ax.set_ylabel("W1")
        ax.set(xlabel="generator step", title=f"{name}: metrics during training")
        ax.legend(loc="lower right")
        curves_png = out / "curves.png"
        fig.savefig(curves_png, dpi=120, bbox_inches="tight")
        plt.close(fig)
        paths.append(curves_png)
    return paths


def main(args: list[str] | None = None, threads: int = 1) -> LightningCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    # 128-wide MLPs on 256 points are too small to gain from intra-op threads: extra threads only spin.
    torch.set_num_threads(threads)
    cli = LightningCLI(
        ToyWGAN,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "lightning-gp-toy", "offline": True, "save_dir": "outputs"},
            },
            "default_root_dir": "outputs",
            "max_epochs": -1,  # the data stream is endless; ToyWGAN stops after `max_generator_steps`
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 50,
        },
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
    if isinstance(cli.trainer.logger, WandbLogger):
        cli.trainer.logger.experiment.finish()  # close the offline run so a next fit starts its own
    return cli


if __name__ == "__main__":
    main()
