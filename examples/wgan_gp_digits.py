"""A convolutional WGAN-GP on scikit-learn's 8×8 digits (bundled with scikit-learn: no download).

Run (LightningCLI; W&B offline by default)::

    python -m examples.wgan_gp_digits fit                           # 60 epochs, a few minutes on a CPU
    python -m examples.wgan_gp_digits fit --trainer.max_epochs=5 --model.regularizer=r1

Each epoch it saves ``out_dir/samples_epoch{NNN}.png``, an 8 × 8 grid of samples drawn from a fixed set of
latent vectors (so the grids show the same "digits" improving), and logs it as ``wandb.Image``.

The critic has no BatchNorm: the gradient penalty is a per-sample quantity and BatchNorm makes each
sample's score depend on the rest of the batch, so ‖∇D(x̂ᵢ)‖ would not be the gradient the penalty
assumes. ``GroupNorm(1, C)`` normalises each sample over (C, H, W), i.e. LayerNorm for feature maps.
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import WandbLogger
from torch import nn

from lightning_gp.gan import WGANGPMixin

try:
    from examples._digits import DigitsDataModule
except ImportError:  # run as a file: python examples/wgan_gp_digits.py
    from _digits import DigitsDataModule  # type: ignore[no-redef]


class Generator(nn.Module):
    """z → 2×2 feature map → 4×4 → 8×8, one channel in [−1, 1]."""

    def __init__(self, latent_dim: int, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.project = nn.Sequential(nn.Linear(latent_dim, 2 * channels * 2 * 2), nn.ReLU())
        self.up = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),  # 2 → 4
            nn.BatchNorm2d(channels),  # fine in the generator: only the critic must be per-sample
            nn.ReLU(),
            nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1),  # 4 → 8
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, 1, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.up(self.project(z).view(-1, 2 * self.channels, 2, 2))


def critic_net(channels: int) -> nn.Sequential:
    """8×8 → 4×4 → 2×2 → score. LeakyReLU keeps ∇D nonzero almost everywhere; GroupNorm(1, C) = LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),  # 8 → 4
        nn.GroupNorm(1, 2 * channels),
        nn.LeakyReLU(0.2),
        nn.Conv2d(2 * channels, 4 * channels, 4, stride=2, padding=1),  # 4 → 2
        nn.GroupNorm(1, 4 * channels),
        nn.LeakyReLU(0.2),
        nn.Flatten(),
        nn.Linear(4 * channels * 2 * 2, 1),
    )


class DigitsWGAN(WGANGPMixin, L.LightningModule):
    """Convolutional WGAN-GP on 8×8 digits.

    Args:
        latent_dim: dimension of the Gaussian latent.
        channels: base channel count of both networks.
        out_dir: where the per-epoch sample grids go.
        n_critic, regularizer, gp_weight, clip_value, reg_every, lr, betas, method: the mixin's options,
            defaulting to the WGAN-GP paper's (λ = 10, Adam 1e-4, β = (0, 0.9)) except a larger lr,
            which this tiny problem tolerates.
    """

    def __init__(
        self,
        latent_dim: int = 32,
        channels: int = 32,
        out_dir: str = "outputs/wgan_digits",
        n_critic: int = 5,
        regularizer: str = "gp",
        gp_weight: float = 10.0,
        clip_value: float = 0.01,
        reg_every: int = 1,
        lr: float = 5e-4,
        betas: tuple[float, float] = (0.0, 0.9),
        method: str = "double_backward",
    ) -> None:
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
        self.generator = Generator(latent_dim, channels)
        self.critic = critic_net(channels)
        self.fixed_z = torch.randn(64, latent_dim, generator=torch.Generator().manual_seed(0))

    def sample_latent(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def real_samples(self, batch) -> torch.Tensor:
        # DigitsDataModule yields (x, y) with x flat in [0, 1]; the generator's Tanh outputs [−1, 1].
        x = batch[0]
        return (2 * x - 1).view(-1, 1, 8, 8)

    def on_train_epoch_end(self) -> None:
        if self.global_rank != 0:
            return
        path = save_grid(self, Path(self.hparams.out_dir) / f"samples_epoch{self.current_epoch:03d}.png")
        if isinstance(self.logger, WandbLogger):
            self.logger.log_image("digits/samples", [str(path)], step=self.global_step)


def save_grid(model: DigitsWGAN, path: Path) -> Path:
    """An 8 × 8 grid of generated digits (generator in eval mode: BatchNorm uses running statistics)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = model.generator.training
    model.generator.eval()
    with torch.no_grad():
        imgs = model.generator(model.fixed_z.to(model.device)).cpu()
    model.generator.train(was_training)
    # (64, 1, 8, 8) → one (8·9, 8·9) image with a one-pixel gap between digits.
    canvas = torch.full((8 * 9 - 1, 8 * 9 - 1), float("nan"))
    for i, img in enumerate(imgs[:, 0]):
        r, c = divmod(i, 8)
        canvas[r * 9 : r * 9 + 8, c * 9 : c * 9 + 8] = (img + 1) / 2
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(canvas.numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_axis_off()
    ax.set_title(f"epoch {model.current_epoch}")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def main(args: list[str] | None = None) -> LightningCLI:
    os.environ.setdefault("WANDB_MODE", "offline")
    cli = LightningCLI(
        DigitsWGAN,
        DigitsDataModule,
        trainer_defaults={
            "logger": {
                "class_path": "lightning.pytorch.loggers.WandbLogger",
                "init_args": {"project": "lightning-gp-digits", "offline": True, "save_dir": "outputs"},
            },
            "default_root_dir": "outputs",
            "max_epochs": 60,
            "limit_val_batches": 0,
            "enable_checkpointing": False,
            "log_every_n_steps": 10,
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
