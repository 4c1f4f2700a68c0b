"""Flooding: |L − b| + b against a hand-written loop."""

from __future__ import annotations

import pytest

from lightning_gp.callbacks import (
    Flooding,
)
from tests.callbacks.test_targets import MLP_PROBLEM, assert_same_training, fit, reference


@pytest.mark.parametrize("level", [0.0, 1.3, 5.0])
def test_flooding_matches_hand_written_loop(level):
    """Above the level it is plain descent, below it ascent (|L − b| + b); 1.3 is crossed during the run."""
    losses = []

    def objective(P, t, m):
        loss = P.loss()
        losses.append(float(loss))
        return (loss - level).abs() + level

    expected = reference(MLP_PROBLEM, objective, steps=5)
    _, got = fit(MLP_PROBLEM, [Flooding(level)], steps=5)
    assert_same_training(got, expected, MLP_PROBLEM, 1e-9)
    if level == 1.3:
        assert min(losses) < level < max(losses)
