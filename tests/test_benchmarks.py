"""The benchmarks stay runnable: each timed step executes and trains (no timing is asserted here)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_functional import build_steps, main, mlp


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_functional_step_runs_and_updates_the_model(optimizer):
    net = mlp()
    steps = build_steps(torch.device("cpu"), batch=16, optimizer=optimizer, model=net)
    for name, step in steps.items():
        before = [p.detach().clone() for p in net.parameters()]
        step()
        changed = any(not torch.equal(b, p) for b, p in zip(before, net.parameters(), strict=True))
        assert changed or name.startswith("WGAN"), name  # the critic rows train the critic instead


def test_functional_benchmark_prints_a_table_with_its_targets():
    text = main(["--quick", "--threads", "1"])
    assert "| data penalty, finite difference |" in text and "≤ 1.90×" in text and "SGD" in text
