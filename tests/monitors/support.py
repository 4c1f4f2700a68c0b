"""Shared pieces of the monitor tests (and of tests/ddp_scripts/monitors_ddp.py): a small classifier,
a deterministic dataset, a quiet Trainer, and independent per-sample references with torch.func."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

N_IN, N_HIDDEN, N_OUT = 6, 8, 3


class Classifier(pl.LightningModule):
    """An MLP written the ordinary way: ``forward`` gives logits, ``training_step`` the mean loss."""

    def __init__(self, *, dropout: float = 0.0, batchnorm: bool = False, raise_at_call: int | None = None):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(N_IN, N_HIDDEN), nn.Tanh()]
        if batchnorm:
            layers.append(nn.BatchNorm1d(N_HIDDEN))
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(N_HIDDEN, N_HIDDEN), nn.ReLU(), nn.Linear(N_HIDDEN, N_OUT)]
        self.net = nn.Sequential(*layers)
        self.raise_at_call = raise_at_call
        self._calls = 0  # every forward, the monitor's too (private: extra passes put public counters back)

    def forward(self, x):
        self._calls += 1
        if self._calls == self.raise_at_call:
            raise RuntimeError("boom")
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def dataset(n: int = 32, seed: int = 1) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, N_IN, generator=gen), torch.randint(0, N_OUT, (n,), generator=gen))


def loader(n: int = 32, batch_size: int = 8) -> DataLoader:
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


def trainer(tmp_path, *, callbacks=(), logger=False, max_steps: int = 4, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=list(callbacks), logger=logger,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, log_every_n_steps=1, **kwargs,
    )


def reference_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ‖∇ₓℓᵢ‖, ‖∇θℓᵢ‖ and per-layer ‖∇_{θ_layer} ℓᵢ‖ with torch.func (vmap of grad), eval mode."""
    from torch.func import functional_call, grad, vmap

    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

    g_params = vmap(grad(loss, argnums=0), in_dims=(None, 0, 0))(params, x, y)
    g_input = vmap(grad(loss, argnums=1), in_dims=(None, 0, 0))(params, x, y)
    model.train(was_training)
    flat = lambda gs: torch.cat([g.reshape(g.shape[0], -1) for g in gs], dim=1).norm(dim=1)  # noqa: E731
    out = {"input": g_input.reshape(len(x), -1).norm(dim=1), "param": flat(g_params.values())}
    layers = sorted({k.rsplit(".", 1)[0] for k in g_params})
    for layer in layers:
        out[f"layer/{layer}"] = flat([g for k, g in g_params.items() if k.rsplit(".", 1)[0] == layer])
    return out


def read_csv(path) -> list[dict[str, float]]:
    """Rows of a CSVLogger metrics.csv, empty cells dropped."""
    import csv

    with open(path) as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
