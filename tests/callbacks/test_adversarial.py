"""AdversarialTraining: its primary pass, random starts across a resume, half-open clamps (the matrices it shares
with the other callbacks are in tests/integration/, its layer targets in tests/callbacks/test_targets.py)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_gp.callbacks import (
    AdversarialTraining,
)
from tests.callbacks.test_features import QUIET, Module, bn_net, fit
from tests.integration.test_exactness import BATCH, dataset, make_net


def test_adversarial_primary_pass_is_the_adversarial_one_when_weight_is_one():
    module = Module(bn_net())
    trainer = fit(module, [AdversarialTraining(0.3, steps=2)], steps=2, precision="64-true")
    assert int(module.net[1].num_batches_tracked) == 2
    assert module.log_calls == 2
    m = trainer.callback_metrics
    torch.testing.assert_close(m["train_loss"], m["adversarial/loss"])  # the user's log saw x_adv


@pytest.mark.parametrize(("norm", "resume_seed"), [("l2", 0), ("linf", 0), ("linf", 1)])
def test_resume_with_random_starts_is_bit_identical(tmp_path, norm, resume_seed):
    """The attack's random start comes from a generator seeded by (the run's seed, rank, step, micro-batch):
    a resumed run draws what the uninterrupted one drew (the global RNG is not checkpointed by Lightning), and the
    run's seed is checkpointed, so a resumed process seeded otherwise (``resume_seed=1``) still draws the same."""
    def run(epochs, ckpt=None, save=None, seed=0):
        pl.seed_everything(seed)
        trainer = pl.Trainer(max_epochs=epochs, precision="64-true", default_root_dir=tmp_path,
                             callbacks=[AdversarialTraining(0.2, norm=norm, steps=2, random_start=True)], **QUIET)
        module = Module(make_net())
        trainer.fit(module, DataLoader(dataset(), batch_size=BATCH), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module

    full = run(2)
    run(1, save=tmp_path / "half.ckpt")
    # seed_everything(0) again: with the global RNG the resumed steps would redraw step 0's starts
    resumed = run(2, ckpt=tmp_path / "half.ckpt", seed=resume_seed)
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_clamp_may_be_half_open_and_epsilon_zero_trains_on_the_clean_batch():
    AdversarialTraining(0.1, clamp=(0.0, math.inf))
    assert AdversarialTraining(0.0, step_size=0.0).step_size == 0.0  # ε = 0: nothing to move


def test_eps_relative_on_a_batch_input_scales_each_sample_s_ball_by_its_own_norm():
    """l∞ PGD with eps_relative: sample i moves by at most ε·max|xᵢ|, and the samples of a larger scale move more."""
    import lightning.pytorch as pl_
    from torch.utils.data import DataLoader as Loader
    from torch.utils.data import TensorDataset as Data

    seen = []

    class Net(pl_.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def training_step(self, batch, batch_idx):
            seen.append(batch[0].detach().clone())
            return torch.nn.functional.cross_entropy(self.lin(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    x = torch.rand(8, 4) * torch.tensor([0.1, 0.1, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])[:, None]
    y = torch.randint(0, 3, (8,))
    cb = AdversarialTraining(0.1, norm="linf", steps=3, eps_relative=True)
    pl_.Trainer(max_steps=1, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False).fit(Net(), Loader(Data(x, y), batch_size=8))
    moved = (seen[-1] - x).abs().amax(1)  # the primary pass saw the adversarial batch
    scale = x.abs().amax(1)
    assert bool((moved <= 0.1 * scale + 1e-6).all()) and bool((moved >= 0.05 * scale).all())


def _learnable(n: int = 64):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 8, generator=g)
    return x, (x[:, :4].sum(1) > x[:, 4:].sum(1)).long()


def _fit_for(callback, steps: int = 100) -> None:
    import lightning.pytorch as pl_
    from torch.utils.data import DataLoader as Loader
    from torch.utils.data import TensorDataset as Data

    class Net(pl_.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))

        def training_step(self, batch, batch_idx):
            return torch.nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    pl_.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False).fit(Net(), Loader(Data(*_learnable()),
                                                                                          batch_size=16))


@pytest.mark.parametrize(("eps", "relative", "found"), [
    (1.0, False, r"has stopped falling since step 25.*64 % of the perturbed tensor's median per-sample norm \(1.56\)"),
    (0.5, True, r"has stopped falling since step 25.*of each sample's norm"),
    (5.0, False, r"ε = 5 is larger than the perturbed tensor's median per-sample norm \(1.56\)"),
])
def test_a_radius_that_stops_learning_is_warned_about_once_with_the_fix(eps, relative, found):
    """A radius of the order of the inputs' own norm (≈ 1.6) replaces them: the adversarial loss settles at chance
    (or ε is larger than the inputs outright), and one warning names the measured scale and eps_relative."""
    with pytest.warns(UserWarning, match=found + r".*eps_relative=True") as record:
        _fit_for(AdversarialTraining(eps, eps_relative=relative))
    assert sum("replaces the input" in str(w.message) for w in record) == 1


def test_a_radius_that_learns_is_not_warned_about():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=".*(?:num_workers|does not have many workers|LeafSpec|litlogger).*")
        _fit_for(AdversarialTraining(0.02, eps_relative=True))
        _fit_for(AdversarialTraining(0.01))  # small against the inputs' norm (≈ 1.6): not looked at
