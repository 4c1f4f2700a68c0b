"""The W&B workspace view (``lightning_gp.dashboard``): every panel reads a key the package logs, and every scalar
the package logs has a panel. Checked against offline runs of every callback and monitor; no server."""

from __future__ import annotations

import re

import pytest
from lightning.pytorch.loggers import WandbLogger

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    GradientNormMonitor,
    MLPInequalityMonitor,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    SharpnessMonitor,
    SpectralNormMonitor,
    SpectralNormPenalty,
    VirtualAdversarialTraining,
)
from tests._lightning.test_wandb_reader import read_run
from tests.monitors.support import Classifier, loader, trainer

pytest.importorskip("wandb_workspaces")

#: Callback sets that can share a run (Flooding and SAM refuse each other).
RUNS = {
    "all": lambda: [DataGradientPenalty(0.1), DataGradientPenalty(0.1, power=1), ParameterGradientPenalty(0.01),
                    SpectralNormPenalty(0.01), AdversarialTraining(0.05), VirtualAdversarialTraining(0.5),
                    GradientNormMonitor(every_n_steps=2, per_layer=True),
                    MLPInequalityMonitor(every_n_steps=2, max_samples=4),
                    SpectralNormMonitor(every_n_steps=2), SharpnessMonitor(every_n_steps=2, iterations=5, trace=True)],
    "flooding": lambda: [Flooding(5.0)],
    "sam": lambda: [SharpnessAwareMinimization(0.05)],
}
#: Keys Lightning or W&B write, not the package.
OWN = re.compile(r"^(exp-)?(trainer/global_step|epoch|_.*|train/loss)$")  # and the test model's own loss


@pytest.fixture(scope="module", params=["", "exp"], ids=["no-prefix", "prefix"])
def logged(request, tmp_path_factory) -> tuple[str, set[str]]:
    """The keys offline runs of every callback and monitor logged, with the logger's ``prefix``."""
    keys: set[str] = set()
    for name, callbacks in RUNS.items():
        root = tmp_path_factory.mktemp(f"dashboard-{name}")
        logger = WandbLogger(offline=True, save_dir=str(root), project="dashboard", prefix=request.param)
        trainer(root, callbacks=callbacks(), logger=[logger], max_steps=4).fit(
            Classifier(), loader())
        logger.experiment.finish()
        keys |= read_run(root).keys()
    return request.param, {k for k in keys if not OWN.match(k)}


def test_every_panel_reads_a_key_the_package_logs(logged):
    from lightning_gp.dashboard import panel_keys, workspace

    prefix, keys = logged
    view = workspace("my-team", "my-project", prefix=prefix)
    assert [s.name for s in view.sections] == ["Penalties and adversarial training", "Per-sample gradient norms",
                                               "MLP inequality", "Lipschitz bounds", "Sharpness"]
    wanted, patterns = panel_keys(view)
    assert not wanted - keys, sorted(wanted - keys)
    for pattern in patterns:
        assert any(re.fullmatch(pattern, k) for k in keys), pattern


def test_every_scalar_the_package_logs_has_a_panel(logged):
    from lightning_gp.dashboard import panel_keys, workspace

    prefix, keys = logged
    wanted, patterns = panel_keys(workspace("my-team", "my-project", prefix=prefix))
    # the per-layer terms of the inequality and the saved images' and tables' own keys aside
    skip = re.compile(r".*(_term/|_epoch$|_table$|/lhs_vs_rhs$|/input_vs_param$|/ratio_sorted$)")
    unshown = {k for k in keys if k not in wanted and not skip.match(k)
               and not any(re.fullmatch(p, k) for p in patterns)}
    assert not unshown, sorted(unshown)


def test_without_wandb_workspaces_the_error_says_what_to_install(monkeypatch):
    import sys

    from lightning_gp.dashboard import workspace

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)
    with pytest.raises(ImportError, match=r'pip install "lightning-gp\[dashboard\]"'):
        workspace("my-team", "my-project")
