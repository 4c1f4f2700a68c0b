"""``nn.Embedding(sparse=True)``: its gradient is a sparse tensor, and every parameter-space callback and monitor
takes the steps and logs the values of the same model with a dense embedding (float64)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import lightning_gp as lgp

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Bag(pl.LightningModule):
    """Mean of token embeddings, then a linear classifier (a bag of words)."""

    def __init__(self, sparse: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(20, 4, sparse=sparse).double()
        self.lin = torch.nn.Linear(4, 3).double()

    def forward(self, tokens):
        return self.lin(torch.tanh(self.emb(tokens).mean(1)))

    def training_step(self, batch, batch_idx):
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)  # sparse gradients: SGD without momentum


def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    tokens, y = torch.randint(0, 20, (24, 5), generator=gen), torch.randint(0, 3, (24,), generator=gen)
    return DataLoader(list(zip(tokens, y, strict=True)), batch_size=8)


CALLBACKS = {
    "SAM": lambda: lgp.SharpnessAwareMinimization(0.05),
    "ASAM": lambda: lgp.SharpnessAwareMinimization(0.5, adaptive=True),
    "SAM beside the parameter penalty": lambda: [lgp.SharpnessAwareMinimization(0.05),
                                                 lgp.ParameterGradientPenalty(0.1, method="finite_difference")],
    "parameter penalty, finite difference": lambda: lgp.ParameterGradientPenalty(0.1, method="finite_difference"),
    "parameter penalty, double backward": lambda: lgp.ParameterGradientPenalty(0.1, method="double_backward"),
    "sharpness monitor": lambda: lgp.SharpnessMonitor(every_n_steps=1, trace=True),
    "gradient-norm monitor": lambda: lgp.GradientNormMonitor(every_n_steps=1, target="emb", histograms=False),
}


class GradKind(pl.Callback):
    """Whether the embedding's gradient reaching the optimizer is sparse, at each step."""

    def __init__(self) -> None:
        self.sparse: list[bool] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sparse.append(pl_module.emb.weight.grad.is_sparse)


@pytest.mark.parametrize("name", list(CALLBACKS))
def test_a_sparse_embedding_trains_and_logs_as_the_dense_one(name):
    results = {}
    for sparse in (True, False):
        made, kind = CALLBACKS[name](), GradKind()
        module = Bag(sparse)
        trainer = pl.Trainer(max_steps=3, callbacks=[kind, *(made if isinstance(made, list) else [made])],
                             log_every_n_steps=1, **QUIET)
        trainer.fit(module, loader())
        assert kind.sparse == [sparse] * 3  # the control: the sparse model's optimizer gets a sparse gradient
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        results[sparse] = (module, metrics)
    (sparse_model, sparse_logged), (dense_model, dense_logged) = results[True], results[False]
    for (n, a), b in zip(sparse_model.named_parameters(), dense_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0, msg=n)
    assert sparse_logged.keys() == dense_logged.keys() and sparse_logged
    for key, value in dense_logged.items():
        if "trace" in key:  # Hutchinson draws: same seed, same probes, but sums in another order
            assert sparse_logged[key] == pytest.approx(value, rel=1e-9), key
        else:
            assert sparse_logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert any(not torch.equal(p, q) for p, q in zip(dense_model.parameters(), Bag(False).parameters(), strict=True))
