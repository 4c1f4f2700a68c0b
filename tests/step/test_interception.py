"""The one interception point: lifetime, ownership, pass-through, and what it composes with."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    GradientNormMonitor,
    ParameterGradientPenalty,
    SpectralNormPenalty,
)
from lightning_gp.step.interception import StepInterceptor
from tests.callbacks.test_features import Module, fit
from tests.integration.test_exactness import BATCH, dataset, make_net

PENALTIES = [
    lambda: DataGradientPenalty(0.5),
    lambda: ParameterGradientPenalty(0.1, method="finite_difference"),
    lambda: AdversarialTraining(0.1),
    lambda: GradientNormMonitor(every_n_steps=1, mode="fused", histograms=False),
]
IDS = ["data", "parameter", "adversarial", "fused_monitor"]


class WrapsLater(pl.Callback):
    """A third party that wraps `training_step` after lightning_gp did (in `on_train_start`)."""

    def __init__(self):
        self.calls = 0

    def on_train_start(self, trainer, pl_module):
        inner = pl_module.training_step

        @functools.wraps(inner)
        def training_step(*args, **kwargs):
            self.calls += 1
            return inner(*args, **kwargs)

        pl_module.training_step = training_step
        self.wrapper = training_step


@pytest.mark.parametrize("make", PENALTIES, ids=IDS)
def test_a_third_party_wrapper_survives_our_teardown(make):
    module, third = Module(make_net()), WrapsLater()
    with pytest.warns(UserWarning, match="training_step` was replaced after lightning_gp wrapped it"):
        fit(module, [make(), third], steps=2)
    assert third.calls == 2
    assert module.__dict__["training_step"] is third.wrapper  # left as it is
    assert StepInterceptor.of(module) is None
    # our wrapper, still inside theirs, passes through: a plain step gives the plain loss
    module.log = lambda *args, **kwargs: None  # outside a loop Lightning refuses `self.log`
    x, y = dataset().tensors[0][:BATCH], dataset().tensors[1][:BATCH]
    torch.testing.assert_close(module.training_step((x, y), 0), F.cross_entropy(module.net(x), y))


@pytest.mark.parametrize("make", PENALTIES, ids=IDS)
def test_the_class_method_is_back_after_fit_and_after_an_exception(make):
    module = Module(make_net())
    fit(module, [make()], steps=2)
    assert "training_step" not in module.__dict__ and StepInterceptor.of(module) is None

    class Boom(pl.Callback):
        def on_train_batch_end(self, *args):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fit(module, [make(), Boom()], steps=2)
    assert "training_step" not in module.__dict__ and StepInterceptor.of(module) is None


def test_an_instance_training_step_of_the_users_is_restored():
    module = Module(make_net())
    own = module.training_step  # an instance attribute set before fit

    def training_step(batch, batch_idx):
        return own(batch, batch_idx)

    module.training_step = training_step
    fit(module, [DataGradientPenalty(0.5), SpectralNormPenalty(0.1)], steps=2)
    assert module.__dict__["training_step"] is training_step


class ValidatesWithTrainingStep(Module):
    """A `validation_step` that reuses `self.training_step`, as many users write it."""

    def validation_step(self, batch, batch_idx):
        loss = self.training_step(batch, batch_idx)
        x, y = batch
        self.val_losses.append((float(loss), float(F.cross_entropy(self.net(x), y))))  # passed through: plain
        return loss


@pytest.mark.parametrize("make", PENALTIES, ids=IDS)
def test_validation_step_calling_training_step_passes_through(make):
    module = ValidatesWithTrainingStep(make_net())
    module.val_losses = []
    loader = DataLoader(dataset(), batch_size=BATCH)
    trainer = pl.Trainer(max_steps=4, callbacks=[make()], val_check_interval=2, limit_val_batches=1,
                         num_sanity_val_steps=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader, loader)
    assert len(module.val_losses) == 2  # the sanity check and the validation after step 2
    for got, plain in module.val_losses:
        assert got == plain


def test_a_call_outside_fit_passes_through():
    trainer, module = pl.Trainer(logger=False), Module(make_net())
    interceptor = StepInterceptor.attach(trainer, module)
    interceptor.register(DataGradientPenalty(0.5), runner=lambda *a: pytest.fail("intercepted outside fit"))
    module.log = lambda *args, **kwargs: None  # outside a loop Lightning refuses `self.log`
    x, y = dataset().tensors[0][:BATCH], dataset().tensors[1][:BATCH]
    torch.testing.assert_close(module.training_step((x, y), 0), F.cross_entropy(module.net(x), y))
    interceptor.detach()
    assert "training_step" not in module.__dict__


def test_installed_once_for_several_members():
    trainer, module = pl.Trainer(logger=False), Module(make_net())
    first = StepInterceptor.attach(trainer, module)
    assert StepInterceptor.attach(trainer, module) is first
    a, b = DataGradientPenalty(0.5), SpectralNormPenalty(0.1)
    first.register(a, runner=lambda *args: None)
    first.register(b, runner=lambda *args: None)
    first.unregister(a)
    assert module.__dict__["training_step"] is first.wrapper  # b still registered
    first.unregister(b)
    assert "training_step" not in module.__dict__


def test_values_reach_callback_metrics_by_the_end_of_every_epoch():
    """Epochs of 4 steps, log_every_n_steps=50: no step is logged, the epoch means still arrive."""
    loader = DataLoader(dataset(), batch_size=dataset().tensors[0].shape[0] // 4)
    for callback in (DataGradientPenalty(0.5), GradientNormMonitor(every_n_steps=2, mode="fused", histograms=False)):
        metrics = fit(Module(make_net()), [callback], steps=8, log_every_n_steps=50, loader=loader).callback_metrics
        assert not any(k.startswith(("penalty/", "grad_norm/")) and not k.endswith("_epoch") for k in metrics)
        if isinstance(callback, DataGradientPenalty):
            assert float(metrics["penalty/data_gradient_epoch"]) > 0
        else:
            assert float(metrics["grad_norm/input_max_epoch"]) >= float(metrics["grad_norm/input_mean_epoch"]) > 0


def test_the_epoch_mean_is_the_sample_weighted_mean_of_the_steps():
    values = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            values.append((float(trainer.callback_metrics["penalty/data_gradient"]), batch[0].shape[0]))

    n = dataset().tensors[0].shape[0]
    trainer = fit(Module(make_net()), [DataGradientPenalty(0.5), Record()], steps=3,
                  loader=DataLoader(dataset(), batch_size=n // 2 - 1))  # 3 batches, the last one larger
    expected = sum(v * b for v, b in values) / sum(b for _, b in values)
    assert float(trainer.callback_metrics["penalty/data_gradient_epoch"]) == pytest.approx(expected, rel=1e-6)


def test_state_key_ignores_hyperparameters_and_repr_shows_the_arguments():
    assert DataGradientPenalty(0.1).state_key == DataGradientPenalty(1.0, method="finite_difference").state_key
    assert DataGradientPenalty(0.1).state_key != DataGradientPenalty(0.1, power=1).state_key  # another penalty
    assert ParameterGradientPenalty(0.1).state_key == ParameterGradientPenalty(0.2, scope="global").state_key
    assert DataGradientPenalty(0.1).state_key != ParameterGradientPenalty(0.1).state_key
    assert repr(DataGradientPenalty(0.1, center=1.0)) == "DataGradientPenalty(weight=0.1, center=1.0)"
    assert repr(GradientNormMonitor(mode="fused")) == "GradientNormMonitor(mode='fused')"


def test_a_resumed_run_with_another_weight_loads_the_callback_state(tmp_path):
    first = SpectralNormPenalty(0.1)
    trainer = fit(Module(make_net()), [first], steps=2)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = SpectralNormPenalty(0.2)  # λ changed on resume: its saved vectors must still load
    trainer = pl.Trainer(max_steps=3, callbacks=[resumed], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Module(make_net()), DataLoader(dataset(), batch_size=BATCH), ckpt_path=ckpt)
    assert resumed.applied == 3 and set(resumed.vectors) == set(first.vectors)


def test_monitors_and_penalties_share_the_trainers_csv_row(tmp_path):
    """With the default interval (the Trainer's log_every_n_steps) the monitors log through `self.log`:
    one CSV row per step, holding the module's, the penalty's and every monitor's values."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    from lightning_gp import MLPInequalityMonitor, SpectralNormMonitor
    from tests.monitors.support import Classifier, loader

    logger = CSVLogger(tmp_path, name="run", version=0)
    monitors = [GradientNormMonitor(histograms=False), SpectralNormMonitor(), MLPInequalityMonitor(max_samples=4),
                SpectralNormPenalty(0.01)]
    trainer = pl.Trainer(max_steps=6, log_every_n_steps=2, callbacks=monitors, logger=logger,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Classifier(), loader(n=48, batch_size=8))
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(set(steps)) == [1, 3, 5]  # one row per logged step
    for row in rows:
        for key in ("train/loss", "penalty/spectral_norm", "grad_norm/input_mean", "lipschitz/upper_bound",
                    "mlp_inequality/ratio_max"):
            assert row[key] != "", (row["step"], key)
