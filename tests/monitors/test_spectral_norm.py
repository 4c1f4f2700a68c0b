from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from lightning_gp import (
    SpectralNormMonitor,
)
from tests.integration.test_trainer_features import QUIET, IteratorStep, data
from tests.monitors.support import Classifier, loader, read_csv, trainer


class WeightsAt(pl.Callback):
    """Records the Linear weights at the start of the batch that takes optimizer step ``step`` (0-based)."""

    def __init__(self, step):
        self.step, self.weights = step, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.weights = {n: m.weight.detach().clone() for n, m in pl_module.named_modules()
                            if isinstance(m, nn.Linear)}


def test_logs_sigma_per_layer_and_their_product_to_csv(tmp_path):
    monitor, weights = SpectralNormMonitor(every_n_steps=2), WeightsAt(3)
    model = Classifier()
    trainer(tmp_path, callbacks=[monitor, weights], logger=CSVLogger(tmp_path), max_steps=4).fit(model, loader())

    rows = [r for r in read_csv(tmp_path / "lightning_logs/version_0/metrics.csv") if "lipschitz/upper_bound" in r]
    # steps 2 and 4 (1-based), logged at Lightning's 0-based step 1 and 3
    assert [r["step"] for r in rows] == [1.0, 3.0]
    # the last measurement used the weights before the 4th update; recompute σ exactly from those
    exact = {name: torch.linalg.matrix_norm(w, ord=2) for name, w in weights.weights.items()}
    for name, sigma in exact.items():
        assert rows[-1][f"lipschitz/sigma/{name}"] == pytest.approx(float(sigma), rel=1e-4)
    assert rows[-1]["lipschitz/upper_bound"] == pytest.approx(float(torch.stack(list(exact.values())).prod()), rel=1e-4)
    assert sorted(exact) == ["net.0", "net.2", "net.4"]


def test_warm_start_vectors_survive_a_checkpoint():
    net = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Conv1d(1, 2, 3))
    monitor = SpectralNormMonitor()
    first = monitor.measure(net)
    restored = SpectralNormMonitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored._vectors.keys() == {"0", "2"}
    again = restored.measure(net)
    for key, value in first.items():
        assert float(again[key]) == pytest.approx(float(value), rel=1e-5)
    # conv kernels as their (out, in·k) matrix
    assert float(first["lipschitz/sigma/2"]) == pytest.approx(
        float(torch.linalg.matrix_norm(net[2].weight.detach().reshape(2, -1), ord=2)), rel=1e-4
    )
    SpectralNormMonitor().load_state_dict({})  # an old checkpoint without the key


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="`every_n_steps` must be an integer >= 1, got 0"):
        SpectralNormMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="`n_iter` must be an integer >= 1, got -1"):
        SpectralNormMonitor(n_iter=-1)

    class NoLayers(Classifier):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Tanh())
            self.w = nn.Parameter(torch.ones(1))

    with pytest.raises(ValueError, match="found no Linear or Conv layer in NoLayers"):
        trainer(tmp_path, callbacks=[SpectralNormMonitor()]).fit(NoLayers(), loader())


def test_the_spectral_monitor_reads_weights_and_runs_with_iterator_steps():
    monitor = SpectralNormMonitor(every_n_steps=1)
    trainer = pl.Trainer(max_steps=2, callbacks=[monitor], **QUIET)
    trainer.fit(IteratorStep(), DataLoader(data(), batch_size=8))
    assert monitor.last_logged
