from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.func import jacrev

from lightning_gp import (
    MLPInequalityMonitor,
)
from tests.integration.test_fuzz_lightning import Net, fit
from tests.monitors.support import Classifier, loader, read_csv, reference_norms, trainer
from tests.monitors.test_gradient_norm import Snapshot


def independent_sides(model, x, y):
    """lhs and rhs of the MLP inequality from jacrev Jacobians and exact matrix norms, sample by sample."""
    lin = [m for m in model.net if isinstance(m, nn.Linear)]
    acts = [torch.tanh, torch.relu]

    def layer_inputs(xi):  # h⁽¹⁾ = x, h⁽ᵗ⁺¹⁾ = g(W⁽ᵗ⁾h⁽ᵗ⁾ + b⁽ᵗ⁾)
        hs = [xi]
        for layer, act in zip(lin, acts, strict=False):
            hs.append(act(layer(hs[-1])))
        return hs

    lhs = []
    for xi, yi in zip(x, y, strict=True):
        gx = jacrev(lambda v, yi=yi: F.cross_entropy(model.net(v[None]), yi[None]))(xi)
        jacs = jacrev(layer_inputs)(xi)
        hs = layer_inputs(xi)
        terms = [(1 + h.square().sum()) / (torch.linalg.matrix_norm(layer.weight, ord=2) ** 2
                                           * torch.linalg.matrix_norm(j, ord=2) ** 2)
                 for h, j, layer in zip(hs, jacs, lin, strict=True)]
        lhs.append(gx.square().sum() * sum(terms))
    return torch.stack(lhs).detach(), reference_norms(model, x, y)["param"].square()


def test_logged_sides_equal_an_independent_computation(tmp_path):
    monitor, snap = MLPInequalityMonitor(every_n_steps=3, max_samples=5), Snapshot(2)
    trainer(tmp_path, callbacks=[monitor, snap], logger=CSVLogger(tmp_path), max_steps=3).fit(Classifier(), loader())
    (got,) = [r for r in read_csv(tmp_path / "lightning_logs/version_0/metrics.csv") if "mlp_inequality/lhs_mean" in r]
    assert got["step"] == 2.0

    x, y = snap.batch[0][:5], snap.batch[1][:5]  # max_samples
    lhs, rhs = independent_sides(snap.model.eval(), x, y)
    ratio = lhs / rhs
    assert got["mlp_inequality/lhs_mean"] == pytest.approx(float(lhs.mean()), rel=1e-4)
    assert got["mlp_inequality/rhs_mean"] == pytest.approx(float(rhs.mean()), rel=1e-4)
    assert got["mlp_inequality/ratio_mean"] == pytest.approx(float(ratio.mean()), rel=1e-4)
    assert got["mlp_inequality/ratio_max"] == pytest.approx(float(ratio.max()), rel=1e-4)
    assert 0 < got["mlp_inequality/ratio_max"] <= 1
    lhs_terms = [got[f"mlp_inequality/lhs_term/net.{i}"] for i in (0, 2, 4)]
    rhs_terms = [got[f"mlp_inequality/rhs_term/net.{i}"] for i in (0, 2, 4)]
    assert sum(lhs_terms) == pytest.approx(got["mlp_inequality/lhs_mean"], rel=1e-5)
    assert sum(rhs_terms) == pytest.approx(got["mlp_inequality/rhs_mean"], rel=1e-5)
    assert all(a <= b * (1 + 1e-5) for a, b in zip(lhs_terms, rhs_terms, strict=True))


class TwoChains(Classifier):
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Identity())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(8, 8)

    def forward(self, h):
        return h + self.inner(h)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="`max_samples` must be an integer >= 1, got 0"):
        MLPInequalityMonitor(max_samples=0)
    with pytest.raises(TypeError, match="`submodule` must be a dotted module name"):
        MLPInequalityMonitor(submodule=0)
    with pytest.raises(ValueError, match=r"TwoChains has 2 nn.Sequential children \['net', 'head'\]") as info:
        trainer(tmp_path, callbacks=[MLPInequalityMonitor()]).fit(TwoChains(), loader())
    assert str(info.value).count("MLPInequalityMonitor") == 1  # said once (setup wrapped it in a second preamble)
    with pytest.raises(ValueError, match="`MLPInequalityMonitor\\(submodule='body'\\)`: Classifier has no such"):
        trainer(tmp_path, callbacks=[MLPInequalityMonitor(submodule="body")]).fit(Classifier(), loader())
    model = Classifier()
    model.net[2] = Residual()  # not a chain: caught at setup, before training
    with pytest.raises(ValueError, match=r"Module '2' \(Residual\) is not a Linear"):
        trainer(tmp_path, callbacks=[MLPInequalityMonitor()]).fit(model, loader())


class ReshapedAndTempered(Classifier):
    """The step feeds the chain a reshaped input and divides its logits by a temperature: the function trained is
    not `net(batch[0])` under cross-entropy."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x.flatten(1)) / 2.0, y)


def test_the_sides_are_those_of_the_training_step():
    """The monitor takes x as the step feeds the chain and f as the step's loss (here the tempered cross-entropy):
    equal to the functional inequality of that f; the old pass (the chain on the raw input, plain cross-entropy)
    could not even run on the (B, 2, 3) input, and on the flattened input measures another f (the control)."""
    from lightning_gp.functional import mlp_inequality

    torch.manual_seed(0)
    model = ReshapedAndTempered().double()
    x, y = torch.randn(6, 2, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    _, result = MLPInequalityMonitor(max_samples=6).measure(model, (x, y))
    want = mlp_inequality(model.net.eval(), x.flatten(1), lambda out: F.cross_entropy(out / 2.0, y, reduction="none"))
    torch.testing.assert_close(result.lhs, want.lhs, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(result.rhs, want.rhs, rtol=1e-9, atol=1e-12)
    other = mlp_inequality(model.net, x.flatten(1), lambda out: F.cross_entropy(out, y, reduction="none"))
    assert float((other.lhs - want.lhs).abs().max()) > 1e-3 * float(want.lhs.abs().max())
    with pytest.raises(ValueError, match=r"chain `net` ran 2 times in `training_step`"):
        twice = ReshapedAndTempered().double()
        twice.training_step = lambda batch, batch_idx: (twice.net(batch[0].flatten(1)) + twice.net(
            batch[0].flatten(1))).logsumexp(1).mean()
        MLPInequalityMonitor(max_samples=6, check_reduction=False).measure(twice, (x, y))


class NotAChain(Net):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.MultiheadAttention(6, 1), torch.nn.Linear(6, 3))


def test_mlp_monitor_does_not_suggest_an_argument_it_lacks():
    with pytest.raises(ValueError) as info:
        fit(NotAChain(), [MLPInequalityMonitor(every_n_steps=1)])
    assert "allow_non_chain" not in str(info.value)
    assert re.search(r"MLPInequalityMonitor: .*MultiheadAttention.*pass `submodule=", str(info.value))
