"""The last cases of the hostile-input suite: each is a clear error or a right number, never a late NaN."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    VirtualAdversarialTraining,
    penalized_loss,
)
from lightning_gp.functional import difference_penalty, spectral_norm_penalty


def test_a_vector_redrawn_after_a_zero_weight_takes_the_cold_start_s_iterations():
    """A layer that starts at zero collapses its vector to 0; the next step draws it again and must converge
    then, not one iteration a step from a random start."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5))
    torch.nn.init.zeros_(net[0].weight)
    vectors: dict = {}
    spectral_norm_penalty(net, vectors=vectors)
    assert not vectors["0"].any()
    with torch.no_grad():
        net[0].weight.copy_(torch.randn(5, 6))
    penalty = spectral_norm_penalty(net, n_iter=1, vectors=vectors)  # the callback's warm setting
    exact = torch.linalg.matrix_norm(net[0].weight.detach(), 2) ** 2
    torch.testing.assert_close(penalty.detach(), exact, rtol=1e-4, atol=0)


def test_difference_penalty_names_a_critic_that_returns_one_number():
    with pytest.raises(ValueError, match=r"`critic\(x\)` must hold one value per sample.*got shape \(\)"):
        difference_penalty(lambda x: x.sum(), torch.randn(16, 3), torch.randn(16, 3))


@pytest.mark.parametrize("make", [lambda: DataGradientPenalty(0.1), lambda: DataGradientPenalty(
    0.1, method="finite_difference"), lambda: AdversarialTraining(0.1), lambda: VirtualAdversarialTraining(0.1)],
    ids=["data", "data_fd", "adversarial", "vat"])
def test_an_empty_batch_is_named(make):
    net = torch.nn.Linear(3, 2)
    batch = (torch.randn(0, 3), torch.randint(0, 2, (0,)))
    with pytest.raises(ValueError, match=r"the batch is empty \(0 samples\)"):
        penalized_loss(net, lambda b: F.cross_entropy(net(b[0]), b[1]), batch, [make()])
