"""CostMonitor: the passes each callback runs, counted exactly; its time shares only for their range (no timing
thresholds: the machines are noisy); a W&B table at the end; the run itself untouched."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_gp import (
    CostMonitor,
    DataGradientPenalty,
    GradientNormMonitor,
    SharpnessAwareMinimization,
    SharpnessMonitor,
)
from tests._lightning.test_wandb_reader import read_run
from tests.monitors.support import Classifier, loader, trainer

#: callbacks → {part: (forward passes, backward passes)} of every measured step, in units of the plain step's pass
CASES = {
    "plain": (lambda: [], {"step": (1, 1)}),
    "sam": (lambda: [SharpnessAwareMinimization(0.05)], {"step": (1, 1), "SharpnessAwareMinimization": (1, 1)}),
    # ∇ₓL with its graph: one more backward; Lightning's backward then runs through the double-backward graph
    # (method="auto" adds, on its first step only, the backward that probes for a double backward)
    "data_double_backward": (lambda: [DataGradientPenalty(0.1, method="double_backward", check_reduction=False)],
                             {"step": (1, 1), "DataGradientPenalty": (0, 1)}),
    # the finite difference takes the step's own backward itself (the loss is linearised) and one at x + h·d
    "data_finite_difference": (lambda: [DataGradientPenalty(0.1, method="finite_difference", check_reduction=False)],
                               {"step": (1, 0), "DataGradientPenalty": (1, 2)}),
    "norms_fused": (lambda: [GradientNormMonitor(every_n_steps=1, mode="fused", histograms=False)],
                    {"step": (1, 1), "GradientNormMonitor": (0, 0)}),
    "norms_recompute": (lambda: [GradientNormMonitor(every_n_steps=1, histograms=False, check_reduction=False)],
                        {"step": (1, 1), "GradientNormMonitor": (1, 1)}),
    # the gradient with its graph, then one Hessian-vector product (a backward) per iteration
    "sharpness": (lambda: [SharpnessMonitor(every_n_steps=1, iterations=4, tol=0.0, method="double_backward")],
                  {"step": (1, 1), "SharpnessMonitor": (1, 5)}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_passes_are_counted_exactly(tmp_path, case):
    make, expected = CASES[case]
    seen = []

    class Every(CostMonitor):
        def _log(self, trainer, metrics, step):
            super()._log(trainer, metrics, step)
            seen.append(dict(metrics))

    trainer(tmp_path, callbacks=[*make(), Every(every_n_steps=1)], max_steps=3).fit(Classifier(), loader())
    assert len(seen) == 3
    for values in seen:
        parts = {k.split("/")[1] for k in values}
        assert parts == set(expected)
        for part, (forward, backward) in expected.items():
            got = values[f"cost/{part}/forward_passes"], values[f"cost/{part}/backward_passes"]
            assert got == (forward, backward), (part, got)
            assert values[f"cost/{part}/passes"] == forward + backward
        fractions = [v for k, v in values.items() if k.endswith("/time_fraction")]
        assert all(0 <= f <= 1 for f in fractions) and sum(fractions) == pytest.approx(1.0, abs=1e-9)


def test_the_run_is_unchanged_and_nothing_is_left_behind(tmp_path):
    torch.manual_seed(0)
    base = Classifier()
    plain, measured = copy.deepcopy(base), copy.deepcopy(base)
    sam = SharpnessAwareMinimization(0.05)
    trainer(tmp_path / "a", callbacks=[SharpnessAwareMinimization(0.05)], max_steps=4).fit(plain, loader())
    cost = CostMonitor(every_n_steps=2)
    trainer(tmp_path / "b", callbacks=[sam, cost], max_steps=4).fit(measured, loader())
    for a, b in zip(plain.parameters(), measured.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not any(k.startswith("on_") for k in sam.__dict__) and not any(k.startswith("on_") for k in cost.__dict__)
    assert all(not m._forward_hooks for m in measured.modules())


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.text = ""

    def emit(self, record):
        self.text += record.getMessage()


def test_the_table_at_the_end_goes_to_the_console_and_to_wandb(tmp_path):
    cost = CostMonitor(every_n_steps=1)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="cost")
    console = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # where Lightning's rank_zero_info writes
    lines, level = _Lines(), console.level
    console.addHandler(lines)
    console.setLevel(logging.INFO)
    try:
        trainer(tmp_path, callbacks=[SharpnessAwareMinimization(0.05), cost], logger=logger, max_steps=2).fit(
            Classifier(), loader())
    finally:
        console.removeHandler(lines)
        console.setLevel(level)
    logger.experiment.finish()
    assert "| SharpnessAwareMinimization | 1 | 1 |" in lines.text and "mean over 2 measured steps" in lines.text
    run = read_run(tmp_path)
    assert run.values("cost/table")
    assert [s for s, _ in run.values("cost/SharpnessAwareMinimization/passes")] == [0, 1]


def test_errors():
    with pytest.raises(ValueError, match=r"CostMonitor\(every_n_steps=0\)|`every_n_steps` must be an integer >= 1"):
        CostMonitor(every_n_steps=0)
