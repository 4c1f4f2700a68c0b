"""Every error the callbacks raise, with its message; the wrapper is removed after a failed fit."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    ParameterGradientPenalty,
    SpectralNormPenalty,
)
from lightning_gp.step._batch import describe, resolve_input

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             max_steps=1)


class Step(pl.LightningModule):
    def __init__(self, step_fn) -> None:
        super().__init__()
        self.net = torch.nn.Linear(4, 2)
        self.step_fn = step_fn

    def training_step(self, batch, batch_idx):
        return self.step_fn(self, batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(step_fn, callback, batch=None):
    data = batch if batch is not None else TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    module = Step(step_fn)
    try:
        pl.Trainer(callbacks=[callback], **QUIET).fit(module, DataLoader(data, batch_size=4))
    finally:
        assert "training_step" not in module.__dict__  # restored also when the step raised


def ce(m, b):
    return F.cross_entropy(m.net(b[0]), b[1])


@pytest.mark.parametrize("callback", [DataGradientPenalty(1.0), ParameterGradientPenalty(1.0),
                                      SpectralNormPenalty(1.0), AdversarialTraining(0.1)])
@pytest.mark.filterwarnings("ignore:.*returned `None`")
def test_training_step_returning_none_skips_the_batch(callback):
    """Lightning's convention: None skips the batch. The callbacks pass it through: no term, no update."""
    module = Step(lambda m, b: None)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    pl.Trainer(callbacks=[callback], **QUIET).fit(module, DataLoader(data, batch_size=4))
    assert callback.applied == 0
    assert "training_step" not in module.__dict__
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_training_step_returning_non_scalar():
    with pytest.raises(ValueError, match=r"loss of shape \(4,\).*needs a scalar"):
        run(lambda m, b: F.cross_entropy(m.net(b[0]), b[1], reduction="none"), DataGradientPenalty(1.0))


def test_dict_without_loss():
    with pytest.raises(ValueError, match="dict without a loss"):
        run(lambda m, b: {"out": ce(m, b)}, DataGradientPenalty(1.0))


@pytest.mark.parametrize("callback", [DataGradientPenalty(1.0), AdversarialTraining(0.1)])
def test_integer_input(callback):
    data = TensorDataset(torch.randint(0, 5, (8, 4)), torch.randint(0, 2, (8,)))
    with pytest.raises(TypeError, match=r"dtype torch.int64 .token ids.*Pass `target=`"):
        run(lambda m, b: F.cross_entropy(m.net(b[0].float()), b[1]), callback, data)


@pytest.mark.parametrize("callback", [DataGradientPenalty(1.0), ParameterGradientPenalty(1.0)])
def test_non_finite_penalty_names_callback_and_step(callback):
    data = TensorDataset(torch.full((8, 4), float("nan")), torch.randint(0, 2, (8,)))
    name = type(callback).__name__
    with pytest.raises(FloatingPointError, match=f"{name}: `penalty/.*` is nan \\(non-finite\\) at global step 0"):
        run(ce, callback, data)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: DataGradientPenalty(-1.0), "`weight` must be a non-negative number, got -1.0"),
    (lambda: ParameterGradientPenalty(-0.5), "`weight` must be a non-negative number"),
    (lambda: SpectralNormPenalty(-1), "`weight` must be a non-negative number"),
    (lambda: DataGradientPenalty(1.0, every_n_steps=0), "`every_n_steps` must be an integer >= 1, got 0"),
    (lambda: ParameterGradientPenalty(1.0, every_n_steps=0), "`every_n_steps` must be an integer >= 1"),
    (lambda: AdversarialTraining(-0.1), "`epsilon` must be a non-negative number, got -0.1"),
    (lambda: AdversarialTraining(0.1, adversarial_weight=1.5), r"`adversarial_weight` must be in \[0, 1\]"),
    (lambda: AdversarialTraining(0.1, norm="l1"), "`norm` must be one of"),
    (lambda: DataGradientPenalty(1.0, method="fd"), "`method` must be one of"),
    (lambda: DataGradientPenalty(1.0, loss_reduction="none"), "`loss_reduction` must be one of"),
    (lambda: ParameterGradientPenalty(1.0, scope="world"), "`scope` must be one of"),
    (lambda: DataGradientPenalty(1.0, power=0.5), "`power` must be a number >= 1"),
    (lambda: SpectralNormPenalty(1.0, n_iter=0), "`n_iter` must be an integer >= 1"),
])
def test_argument_checks(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_input_key_errors_show_the_batch_structure():
    batch = {"a": torch.randn(2, 3), "b": torch.zeros(2, dtype=torch.long)}
    with pytest.raises(ValueError, match=r"keys \['a', 'b'\] and none of \['x', 'input', 'inputs'\].*"
                                         r"Batch: \{'a': Tensor\[2, 3\], 'b': Tensor\[2\]\(torch.int64\)\}"):
        resolve_input(batch, None, "DataGradientPenalty")
    with pytest.raises(ValueError, match=r"input_key=5\)` cannot be resolved.*Batch: \(Tensor\[2, 3\]\)"):
        resolve_input((torch.randn(2, 3),), 5, "DataGradientPenalty")
    with pytest.raises(ValueError, match="not an element of the batch"):
        resolve_input(batch, lambda b: b["a"] * 2, "AdversarialTraining")
    with pytest.raises(ValueError, match="selects a int"):
        resolve_input((3, torch.randn(2)), 0, "DataGradientPenalty")
    with pytest.raises(ValueError, match="cannot tell which part"):
        resolve_input(object(), None, "DataGradientPenalty")
    assert describe([torch.randn(2, 3), {"y": torch.zeros(2)}]) == "[Tensor[2, 3], {'y': Tensor[2]}]"
