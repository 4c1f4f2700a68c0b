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
