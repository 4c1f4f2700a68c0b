"""Trainer features × callbacks: every cell equals the hand-written loop of ``tests/integration/test_exactness.py``.

The features here leave the math of a step alone (a feature that changes it, accumulation and clipping, has its
own hand-written loop there), so each callback configuration must train exactly as the plain-torch loop does
under each of them: a feature that re-runs, skips or double-counts a pass shows up as a different update.
"""

from __future__ import annotations

import pytest

from tests.integration.test_exactness import CASES, SPECTRAL, hand_run, lightning_run

FEATURES = {
    "log_every_step": dict(log_every_n_steps=1),
    "deterministic": dict(deterministic=True),
    "detect_anomaly": dict(detect_anomaly=True),
    "barebones": dict(barebones=True),
    "clip_norm_inactive": dict(gradient_clip_val=1e9),  # the clipping path runs, a bound never reached
    "clip_value_inactive": dict(gradient_clip_val=1e9, gradient_clip_algorithm="value"),
    "limit_val_batches": dict(limit_val_batches=0, num_sanity_val_steps=0),
}
CELLS = [(f, c) for f in FEATURES for c in CASES]


@pytest.mark.parametrize(("feature", "case"), CELLS, ids=[f"{f}-{c}" for f, c in CELLS])
def test_every_feature_trains_each_callback_as_the_hand_written_loop(feature, case):
    callbacks, hand = CASES[case]
    SPECTRAL.u.clear()
    expected = hand_run(hand)
    got = lightning_run(callbacks(), **FEATURES[feature])
    worst = max((float((got[k] - v).abs().max()), k) for k, v in expected.items())
    assert worst[0] <= 1e-6, (feature, case, worst)
