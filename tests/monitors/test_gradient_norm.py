from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import (
    GradientNormMonitor,
    MLPInequalityMonitor,
    SharpnessMonitor,
    SpectralNormMonitor,
)
from tests.integration.test_fuzz_lightning import Net, fit
from tests.monitors.support import Classifier, loader, read_csv, reference_norms, trainer


class Snapshot(pl.Callback):
    """Copies the module and the batch at the start of the batch that takes optimizer step ``step``."""

    def __init__(self, step):
        self.step, self.model, self.batch = step, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            self.model, self.batch = copy.deepcopy(pl_module), [t.clone() for t in batch]


def test_logged_values_equal_torch_func_per_sample_norms(tmp_path):
    monitor, snap = GradientNormMonitor(per_layer=True, every_n_steps=2), Snapshot(3)
    trainer(tmp_path, callbacks=[monitor, snap], logger=CSVLogger(tmp_path), max_steps=4).fit(Classifier(), loader())
    rows = [r for r in read_csv(tmp_path / "lightning_logs/version_0/metrics.csv") if "grad_norm/input_mean" in r]
    assert [r["step"] for r in rows] == [1.0, 3.0]  # the 2nd and 4th optimizer steps only
    got = rows[-1]

    x, y = snap.batch
    ref = reference_norms(snap.model, x, y)
    assert got["grad_norm/input_mean"] == pytest.approx(float(ref["input"].mean()), rel=1e-5)
    assert got["grad_norm/input_max"] == pytest.approx(float(ref["input"].max()), rel=1e-5)
    assert got["grad_norm/param_per_sample_mean"] == pytest.approx(float(ref["param"].mean()), rel=1e-5)
    assert got["grad_norm/param_per_sample_max"] == pytest.approx(float(ref["param"].max()), rel=1e-5)
    for layer in ("net.0", "net.2", "net.4"):
        assert got[f"grad_norm/layer/{layer}"] == pytest.approx(float(ref[f"layer/{layer}"].mean()), rel=1e-5)
    # ‖∇θL‖ of the batch-mean loss of that step
    grads = torch.autograd.grad(F.cross_entropy(snap.model(x), y), list(snap.model.parameters()))
    batch_norm = torch.cat([g.flatten() for g in grads]).norm()
    assert got["grad_norm/param_batch"] == pytest.approx(float(batch_norm), rel=1e-5)
    assert monitor.last_logged == {k: pytest.approx(v) for k, v in got.items() if k.startswith("grad_norm/")}


def _fit(tmp_path, callbacks, model, max_steps=4):
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=callbacks, max_steps=max_steps).fit(model, loader())
    return model


def test_monitors_never_change_training(tmp_path):
    # dropout draws random numbers and BatchNorm updates running statistics in training mode: the
    # monitors' extra passes must do neither
    torch.manual_seed(0)
    base = Classifier(dropout=0.3, batchnorm=True)
    plain = _fit(tmp_path / "a", [], copy.deepcopy(base))
    monitored = _fit(tmp_path / "b", [GradientNormMonitor(every_n_steps=1), SpectralNormMonitor(every_n_steps=1)],
                     copy.deepcopy(base))
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


class Modes(pl.Callback):
    """Puts the dropout layer in eval mode before the monitor runs; records every module's mode after it."""

    def __init__(self, before):
        self.before, self.seen = before, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.before:
            pl_module.net[3].eval()
        else:
            self.seen.append({name: m.training for name, m in pl_module.named_modules()})


def test_module_modes_are_restored(tmp_path):
    before, after = Modes(True), Modes(False)
    model = Classifier(dropout=0.3, batchnorm=True)
    _fit(tmp_path, [before, GradientNormMonitor(every_n_steps=1), after], model, max_steps=2)
    expected = {name: name != "net.3" for name, _ in model.named_modules()}
    assert after.seen == [expected, expected]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("where", ["monitor", "training_step"])
def test_nothing_is_left_behind_when_a_step_raises(tmp_path, where):
    # forward calls with a monitor at every step: step 0 = calls 1 (monitor), 2 and 3 (the reduction check on the
    # two half-batches, first measurement only), 4 (training); step 1 = 5 (monitor), 6 (training)
    torch.manual_seed(0)
    base = Classifier()
    base.net[2].weight.requires_grad_(False)  # a frozen weight must stay frozen
    reference = copy.deepcopy(base)
    reference.raise_at_call = 2  # no monitor: the training forward of step 1 raises
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path / "ref", [], reference)

    model = copy.deepcopy(base)
    model.raise_at_call = 5 if where == "monitor" else 6
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path / "mon", [GradientNormMonitor(every_n_steps=1)], model)
    assert _hooks(model) == 0
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    assert all(m.training for m in model.modules())
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path):
    monitor = GradientNormMonitor(every_n_steps=1, per_layer=False, histograms=False)
    trainer(tmp_path, callbacks=[monitor], logger=CSVLogger(tmp_path), max_steps=2,
            accumulate_grad_batches=2).fit(Classifier(), loader())
    rows = [r for r in read_csv(tmp_path / "lightning_logs/version_0/metrics.csv") if "grad_norm/input_mean" in r]
    assert [r["step"] for r in rows] == [0.0, 1.0]
    assert all("grad_norm/param_batch" in r and "grad_norm/layer/net.0" not in r for r in rows)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="`every_n_steps` must be an integer >= 1, got 0"):
        GradientNormMonitor(every_n_steps=0)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        GradientNormMonitor(loss_fn="ce")
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    net = Classifier()
    with pytest.raises(ValueError, match=r"default per-sample loss .* finds no targets in the batch"):
        GradientNormMonitor(forward_fn=lambda m, b: m(b["x"])).measure(net, {"x": x})
    with pytest.raises(ValueError, match=r"`loss_fn\(outputs, batch\)` must hold one value per sample"):
        GradientNormMonitor(loss_fn=lambda out, batch: out).measure(net, (x, y))
    bad = GradientNormMonitor(every_n_steps=1, input_key="image")
    with pytest.raises(ValueError, match="input_key='image'"):
        trainer(tmp_path, callbacks=[bad], max_steps=1).fit(Classifier(), loader())


def test_a_manually_optimized_module_is_refused_in_setup_or_measured_through_forward_fn(tmp_path):
    """Its training_step steps the optimizer, so no monitor may re-run it."""
    from tests.monitors.test_fused import Manual

    for monitor, fix in [(GradientNormMonitor(every_n_steps=1), r"Pass `forward_fn=lambda module, batch"),
                         (MLPInequalityMonitor(every_n_steps=1), r"Pass `forward_fn=lambda module, batch"),
                         (SharpnessMonitor(every_n_steps=1), r"would train the model")]:
        with pytest.raises(RuntimeError, match=rf"{type(monitor).__name__} .*manual optimization.*{fix}"):
            trainer(tmp_path, callbacks=[monitor], max_steps=1).fit(Manual(), loader())
    model = Manual()
    before = copy.deepcopy(model)
    explicit = GradientNormMonitor(every_n_steps=1, histograms=False, forward_fn=lambda m, b: m(b[0]),
                                   loss_fn=lambda out, b: F.cross_entropy(out, b[1], reduction="none"))
    trainer(tmp_path, callbacks=[explicit], max_steps=1).fit(model, loader())
    ref = reference_norms(before, *next(iter(loader())))
    assert explicit.last_logged["grad_norm/param_per_sample_mean"] == pytest.approx(float(ref["param"].mean()),
                                                                                     rel=1e-5)


# ----------------------------------------------------------------------------------------- monitors
class Regression(Net):
    def training_step(self, batch, batch_idx):
        return F.mse_loss(self.net(batch[0])[:, :1], batch[1])


def regression_loader():
    gen = torch.Generator().manual_seed(4)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=gen), torch.randn(8, 1, generator=gen)), batch_size=4)


def test_gradient_norm_monitor_measures_the_step_and_refuses_float_targets_for_its_cross_entropy():
    """The default measures the step's own loss (an MSE here); the explicit forward with the default cross-entropy
    refuses float targets and names `loss_fn`; a given `loss_fn` is measured."""
    x, y = next(iter(regression_loader()))
    module = Regression()
    xl = x.clone().requires_grad_(True)
    # B · ∇ₓ of the step's mean loss: each row is ∇ₓℓᵢ
    (g,) = torch.autograd.grad(F.mse_loss(module.net(xl)[:, :1], y) * len(x), xl)
    default = GradientNormMonitor(every_n_steps=1, histograms=False)
    fit(module, [default], regression_loader(), steps=1)
    assert abs(default.last_logged["grad_norm/input_max"] - float(g.norm(dim=1).max())) < 1e-5
    with pytest.raises(ValueError, match=r"cross-entropy against integer class labels.*torch.float32 of shape "
                                         r"\[4, 1\].*Pass your per-sample loss, e.g. `loss_fn="):
        fit(Regression(), [GradientNormMonitor(every_n_steps=1, forward_fn=lambda m, b: m(b[0]))],
            regression_loader(), steps=1)

    def mse(outputs, batch):
        return (outputs[:, :1] - batch[1]).square().flatten(1).mean(1)

    monitor = GradientNormMonitor(every_n_steps=1, loss_fn=mse, histograms=False)
    module = Regression()
    (g,) = torch.autograd.grad(mse(module.net(xl), (x, y)).sum(), xl)  # eval = train here (no dropout)
    fit(module, [monitor], regression_loader(), steps=1)
    assert monitor.last_logged["grad_norm/input_max"] > 0
    assert abs(monitor.last_logged["grad_norm/input_max"] - float(g.norm(dim=1).max())) < 1e-5


class _Steps(pl.Callback):
    def __init__(self):
        self.started = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.started += 1


class _DictNet(pl.LightningModule):
    """A dict batch whose input key is none of the defaults (x, input, inputs)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.lin(batch["features"]), batch["label"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_a_batch_without_a_findable_input_is_refused_at_the_first_step_not_the_first_measured_one(mode):
    data = [{"features": torch.randn(4), "label": torch.tensor(i % 3)} for i in range(32)]
    steps = _Steps()
    monitor = GradientNormMonitor(every_n_steps=5, mode=mode, histograms=False)
    with pytest.raises(ValueError, match=r"cannot tell which entry of the batch is the input.*Pass `input_key="):
        pl.Trainer(max_steps=6, callbacks=[steps, monitor], logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False).fit(_DictNet(), DataLoader(data, 4))
    assert steps.started == 1  # refused on the first batch, four steps before the first measurement
