"""Tiny WGAN modules shared by the WGAN mixin tests and their DDP script."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.gan.mixin import WGANGPMixin


def mlp(d_in: int, d_out: int, hidden: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


class TinyGAN(WGANGPMixin, L.LightningModule):
    """2-d data, smooth MLPs (tanh) so double backward and finite differences both apply."""

    def __init__(self, dim: int = 2, latent_dim: int = 3, critic: nn.Module | None = None,
                 generator: nn.Module | None = None, **kwargs):
        super().__init__(**kwargs)
        self.latent_dim = latent_dim
        self.generator = generator if generator is not None else mlp(latent_dim, dim)
        self.critic = critic if critic is not None else mlp(dim, 1)

    def sample_latent(self, n):
        return torch.randn(n, self.latent_dim, device=self.device, dtype=self.dtype)


class RecordingGAN(TinyGAN):
    """Records every z and α the mixin draws, so a hand-written step can reuse them."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.drawn: list[tuple[str, torch.Tensor]] = []

    def sample_latent(self, n):
        z = super().sample_latent(n)
        self.drawn.append(("z", z.clone()))
        return z

    def sample_alpha(self, n):
        a = super().sample_alpha(n).to(self.dtype)
        self.drawn.append(("alpha", a.clone()))
        return a


class SGDGAN(RecordingGAN):
    """Plain SGD with lr 1, so a parameter update equals minus the gradient (and the user's optimizers win)."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.generator.parameters(), lr=1.0), torch.optim.SGD(self.critic.parameters(), lr=1.0)


def _seeded_normal(shape, *keys: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(hash(keys) & 0x7FFFFFFF)
    return torch.randn(shape, generator=g, dtype=dtype)


def _seeded_uniform(*keys: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(hash(keys) & 0x7FFFFFFF)
    return torch.rand((), generator=g, dtype=dtype)


class IndexedGAN(TinyGAN):
    """z and α are functions of (draw number, global sample index): the seam that makes a DDP run
    comparable with one process on the combined batch (each sample gets the same noise in both)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._draws = 0
        self._index: torch.Tensor | None = None
        self.seen: list[torch.Tensor] = []  # the global sample indices of each batch, in order

    def real_samples(self, batch):
        x, self._index = batch
        self.seen.append(self._index.detach().cpu().clone())
        return x

    def sample_latent(self, n):
        self._draws += 1
        z = torch.stack([_seeded_normal(self.latent_dim, self._draws, 0, int(i)) for i in self._index])
        return z.to(self.device, self.dtype)

    def sample_alpha(self, n):
        self._draws += 1
        return torch.stack([_seeded_uniform(self._draws, 1, int(i)) for i in self._index]).to(self.device)


def indexed_data(n: int = 48, dim: int = 2) -> TensorDataset:
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 0.5 + 1.0
    return TensorDataset(x, torch.arange(n))


def indexed_loader(batch_size: int, n: int = 48, order: list[int] | None = None) -> DataLoader:
    """Sequential batches, or batches in the given sample order (to replay what DDP ranks saw)."""
    return DataLoader(indexed_data(n), batch_size=batch_size, shuffle=False, sampler=order)


def trainer_kwargs(**overrides) -> dict:
    kwargs = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    kwargs.update(overrides)
    return kwargs
