"""Callbacks with BatchNorm, dropout, logging, AMP, checkpoint resume, input_key and manual optimization."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    ParameterGradientPenalty,
    SpectralNormPenalty,
)
from tests.integration.test_exactness import BATCH, LR, STEPS, dataset, make_net

# The callbacks log on the steps the loggers write (every `log_every_n_steps`): 1 here, so that
# `trainer.callback_metrics` holds the last step's values.
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             log_every_n_steps=1)


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, batch_format: str = "tuple") -> None:
        super().__init__()
        self.net = net
        self.batch_format = batch_format
        self.log_calls = 0

    def log(self, *args, **kwargs):
        self.log_calls += 1
        return super().log(*args, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = (batch["inputs"], batch["target"]) if self.batch_format == "dict" else batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss} if self.batch_format == "dict" else loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def fit(module, callbacks, *, steps=STEPS, loader=None, **kwargs) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(module, loader if loader is not None else DataLoader(dataset(), batch_size=BATCH))
    return trainer


def bn_net(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(3)
    layers = [torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh()]
    layers += [torch.nn.Dropout(dropout)] if dropout else []
    return torch.nn.Sequential(*layers, torch.nn.Linear(8, 3)).double()


@pytest.mark.parametrize("callbacks", [
    lambda: [DataGradientPenalty(0.5, method="finite_difference")],
    lambda: [ParameterGradientPenalty(0.5, method="finite_difference")],
    lambda: [AdversarialTraining(0.3, adversarial_weight=0.5, steps=2)],
], ids=["data_fd", "parameter_fd", "adversarial_mixed"])
def test_extra_passes_leave_batchnorm_statistics_and_logs_alone(callbacks):
    net = bn_net()
    initial = copy.deepcopy(net)
    module = Module(net)
    fit(module, callbacks(), steps=1, precision="64-true")
    bn = net[1]
    x = dataset().tensors[0][:BATCH]
    reference = copy.deepcopy(initial[1])
    reference(initial[0](x))  # one forward on the clean batch: the primary pass
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, reference.running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(bn.running_var, reference.running_var, atol=1e-12, rtol=0)
    assert module.log_calls == 1  # the user's self.log ran in the primary pass only
    assert "training_step" not in module.__dict__  # the wrapper is removed after fit


def test_amp_gradscaler_penalty_is_computed_on_unscaled_gradients():
    """16-mixed with a GradScaler (CPU: Lightning accepts an explicit plugin): the scaler multiplies the loss
    only at backward, so the penalty seen inside training_step is the unscaled one."""
    def penalties(**kwargs):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        ds = TensorDataset(dataset().tensors[0].float(), dataset().tensors[1])
        trainer = fit(Module(net), [DataGradientPenalty(0.5), ParameterGradientPenalty(0.1)], steps=1,
                      loader=DataLoader(ds, batch_size=BATCH), **kwargs)
        m = trainer.callback_metrics
        return torch.stack([m["penalty/data_gradient"], m["penalty/parameter_gradient"]]).float()

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp = penalties(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    full = penalties()
    assert scaler.get_scale() == 2.0**12  # the step was taken (no inf/NaN skipped it)
    torch.testing.assert_close(amp, full, rtol=2e-2, atol=1e-4)  # not 2**24 times larger


def test_checkpoint_resume_is_bit_identical(tmp_path):
    def callbacks():
        return [DataGradientPenalty(0.5, every_n_steps=2), SpectralNormPenalty(0.05),
                ParameterGradientPenalty(0.1, method="finite_difference")]

    def trainer(epochs, **kwargs):
        return pl.Trainer(max_epochs=epochs, callbacks=callbacks(), precision="64-true", default_root_dir=tmp_path,
                          **{**QUIET, **kwargs})

    loader = DataLoader(dataset(), batch_size=BATCH)  # 3 steps an epoch: the lazy schedule crosses the resume
    full = Module(make_net())
    whole = trainer(2)
    whole.fit(full, loader)

    first = trainer(1)
    first.fit(Module(make_net()), loader)
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed_module = Module(make_net())
    resumed = trainer(2)
    resumed.fit(resumed_module, loader, ckpt_path=tmp_path / "half.ckpt")

    for key, value in full.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[key], value), key
    spec_a = next(c for c in whole.callbacks if isinstance(c, SpectralNormPenalty))
    spec_b = next(c for c in resumed.callbacks if isinstance(c, SpectralNormPenalty))
    assert spec_a.vectors.keys() == spec_b.vectors.keys() == {"net.0", "net.2"}
    for k in spec_a.vectors:
        assert torch.equal(spec_a.vectors[k], spec_b.vectors[k])
    lazy = next(c for c in resumed.callbacks if isinstance(c, DataGradientPenalty))
    assert lazy.applied == 3  # steps 0, 2, 4 of 6


def test_callbacks_log_exactly_on_the_steps_the_logger_writes(tmp_path):
    """`self.log` costs ~2 ms, so the callbacks log only on the logger's steps (every `log_every_n_steps`):
    each row the logger writes carries the penalties, and values of the other steps are never logged."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    class Seen(pl.Callback):
        def __init__(self):
            self.values = []

        def on_train_batch_end(self, trainer, *args):
            value = trainer.callback_metrics.get("penalty/data_gradient")
            self.values.append(None if value is None else float(value))

    logger, seen = CSVLogger(tmp_path, name="run", version=0), Seen()
    penalties = [DataGradientPenalty(0.5), ParameterGradientPenalty(0.1, method="finite_difference"),
                 AdversarialTraining(0.1, adversarial_weight=0.5)]
    fit(Module(make_net()), [*penalties, seen], steps=6, logger=logger, log_every_n_steps=3)
    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = ("penalty/data_gradient", "penalty/parameter_gradient", "adversarial/loss", "adversarial/clean_loss")
    assert [int(r["step"]) for r in rows] == [2, 5]  # Lightning writes steps 3 and 6 (0-based 2 and 5)
    for row in rows:
        assert all(row[k] != "" for k in keys), row
    assert penalties[0].applied == 6  # computed (and checked for NaN) on every step ...
    v = seen.values  # ... logged on steps 3 and 6 only
    assert v[0] is None and v[1] is None
    assert v[2] == v[3] == v[4] == pytest.approx(float(rows[0]["penalty/data_gradient"]), rel=1e-6)
    assert v[5] != v[4] and v[5] == pytest.approx(float(rows[1]["penalty/data_gradient"]), rel=1e-6)


def test_state_keys_come_from_identity_not_hyperparameters_and_are_computed_once():
    """A resumed run may retune λ, ε or the method and still restore the callback's state; two callbacks of
    one class in one Trainer are told apart by what they apply to (`input_key`) and, for the data penalty, by its
    shape."""
    from lightning_gp.callbacks import (
        AdversarialTraining,
        DataGradientPenalty,
        ParameterGradientPenalty,
        SpectralNormPenalty,
    )

    callbacks = [DataGradientPenalty(0.1), DataGradientPenalty(0.1, input_key="x"),
                 ParameterGradientPenalty(0.1), SpectralNormPenalty(0.1), AdversarialTraining(0.1),
                 AdversarialTraining(0.1, input_key=1)]
    keys = [cb.state_key for cb in callbacks]
    assert len(set(keys)) == len(keys)
    assert keys[0] == "DataGradientPenalty" and keys[1] == "DataGradientPenalty{'input_key': \"'x'\"}"
    assert DataGradientPenalty(0.2, method="finite_difference").state_key == keys[0]
    # the penalty's shape is which penalty it is: λ‖∇ₓℓ‖² and ε‖∇ₓℓ‖ train side by side, each with its state
    assert DataGradientPenalty(0.2, power=1).state_key == "DataGradientPenalty{'power': 1.0}"
    assert AdversarialTraining(0.3, steps=5).state_key == keys[4]
    assert callbacks[0].state_key is keys[0]  # cached: Lightning reads it on every hook call
