"""The interception point composes with torch.compile (of the LightningModule and of submodules) and with
LightningCLI, whose help lists the choices of every string option."""

from __future__ import annotations

import contextlib
import io

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_gp import DataGradientPenalty, GradientNormMonitor, ParameterGradientPenalty
from tests.integration.test_exactness import BATCH, dataset

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
             log_every_n_steps=1)


class GraphCounter:
    """A torch.compile backend that runs the captured graphs eagerly and counts them."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()


class Net(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Counts(pl.Callback):
    def __init__(self, counter):
        self.counter, self.after_step = counter, []

    def on_train_batch_end(self, *args):
        self.after_step.append(self.counter.graphs)


def run(module, callbacks, steps=6):
    pl.Trainer(max_steps=steps, callbacks=callbacks, **QUIET).fit(module, DataLoader(dataset(), batch_size=BATCH))
    return module


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("every", [1, 2])
def test_a_compiled_network_under_the_fused_monitor_compiles_a_fixed_number_of_graphs(every):
    """Plain training compiles 1 graph. With the fused monitor each Linear's forward hook puts a tensor hook
    on the layer's output, which torch.compile cannot trace (a side effect on Python state), so the graph
    breaks at each layer: 3 graphs for 3 Linear layers (the hooks themselves run eagerly and add none).
    Measured every second step, the unbroken graph of the unmonitored steps is kept too: 4. Never more."""
    counter = GraphCounter()
    counts = Counts(counter)
    run(Net(torch.compile(mlp(), backend=counter)), [counts])
    assert counts.after_step == [1] * 6

    counter = GraphCounter()
    counts = Counts(counter)
    monitor = GradientNormMonitor(every_n_steps=every, mode="fused", histograms=False)
    run(Net(torch.compile(mlp(), backend=counter)), [monitor, counts])
    assert counts.after_step == ([3] * 6 if every == 1 else [1] + [4] * 5)
    assert monitor.last_logged["grad_norm/input_mean"] > 0


@pytest.mark.parametrize("where", ["module", "submodule"])
@pytest.mark.parametrize("make", [
    lambda: DataGradientPenalty(0.5, method="finite_difference"),
    lambda: ParameterGradientPenalty(0.1, method="finite_difference"),
], ids=["data", "parameter"])
def test_finite_difference_penalties_train_a_compiled_model_as_an_eager_one(make, where):
    eager = run(Net(mlp()), [make()], steps=3)
    if where == "module":
        compiled = torch.compile(Net(mlp()), backend="aot_eager")
    else:
        compiled = Net(torch.compile(mlp(), backend="aot_eager"))
    trained = run(compiled, [make()], steps=3)
    trained = getattr(trained, "_orig_mod", trained)
    for (name, p), q in zip(eager.named_parameters(), trained.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def _cli_help(*args: str) -> str:
    from lightning.pytorch.cli import LightningCLI

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        LightningCLI(Net, args=["fit", *args], run=False, save_config_callback=None)
    return out.getvalue()


@pytest.mark.parametrize(("callback", "choices"), [
    ("DataGradientPenalty", ["double_backward", "finite_difference", "mean", "sum"]),
    ("ParameterGradientPenalty", ["local", "global"]),
    ("AdversarialTraining", ["l2", "linf"]),
    ("GradientNormMonitor", ["recompute", "fused"]),
])
def test_lightning_cli_lists_the_choices(callback, choices):
    pytest.importorskip("jsonargparse")
    text = _cli_help("--trainer.callbacks.help", f"lightning_gp.{callback}")
    for choice in choices:
        assert choice in text, (callback, choice)


def test_lightning_cli_builds_a_callback_from_arguments():
    from lightning.pytorch.cli import LightningCLI

    class Model(Net):
        def __init__(self):
            super().__init__(mlp())

    cli = LightningCLI(Model, run=False, save_config_callback=None, args=[
        "--trainer.callbacks+=lightning_gp.DataGradientPenalty", "--trainer.callbacks.weight=0.3",
        "--trainer.callbacks.method=finite_difference", "--trainer.logger=false"])
    (penalty,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, DataGradientPenalty)]
    assert repr(penalty) == "DataGradientPenalty(weight=0.3, method='finite_difference')"
    with pytest.raises(SystemExit):  # a choice that is not one is refused by the parser
        LightningCLI(Model, run=False, save_config_callback=None, args=[
            "--trainer.callbacks+=lightning_gp.DataGradientPenalty", "--trainer.callbacks.weight=0.3",
            "--trainer.callbacks.method=finite_differences"])


@pytest.mark.parametrize("make", [
    lambda: DataGradientPenalty(0.5, method="double_backward"),
    lambda: ParameterGradientPenalty(0.1, method="double_backward"),
], ids=["data", "parameter"])
@pytest.mark.parametrize("where", ["module", "submodule"])
def test_double_backward_on_a_compiled_model_is_refused_in_setup(make, where):
    """torch would say 'aot_autograd does not currently support double backward' or 'donated buffers'
    (depending on its state) in Lightning's backward; the callback names the way out before training."""
    module = torch.compile(Net(mlp()), backend="aot_eager") if where == "module" else Net(
        torch.compile(mlp(), backend="aot_eager"))
    name = "`Net` itself" if where == "module" else "`net`"
    with pytest.raises(RuntimeError, match=rf"no double backward \({name}\). Use method='finite_difference'"):
        run(module, [make()], steps=1)


@pytest.mark.parametrize("make", [lambda: DataGradientPenalty(0.5), lambda: ParameterGradientPenalty(0.1)],
                         ids=["data", "parameter"])
def test_the_default_method_takes_finite_differences_on_a_compiled_model(make):
    """method='auto' (the default) sees the compiled module in setup and says what it chose in its repr."""
    callback = make()
    module = run(Net(torch.compile(mlp(), backend="aot_eager")), [callback], steps=2)
    assert callback.resolved_method == "finite_difference"
    assert "method='auto' -> 'finite_difference'" in repr(callback)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_inductor_with_a_warm_cache_trains_both_finite_difference_penalties():
    """The real default backend, compiled twice (the second fit finds the inductor cache warm), with the
    finite-difference penalties that `method='auto'` picks for a compiled module."""

    class Compiled(Net):
        def __init__(self):
            super().__init__(torch.compile(mlp().float()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x.float()), y)

    for _ in range(2):
        for make in (lambda: DataGradientPenalty(0.5), lambda: ParameterGradientPenalty(0.1)):
            callback = make()
            module = run(Compiled(), [callback], steps=3)
            assert callback.resolved_method == "finite_difference"
            assert all(torch.isfinite(p).all() for p in module.parameters())


def test_the_docs_yaml_config_builds_its_callbacks(tmp_path):
    """The LightningCLI config of docs/callbacks.md, as printed there, gives the callbacks it names."""
    import re
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from lightning_gp import AdversarialTraining, RobustAccuracy

    page = (Path(__file__).resolve().parents[2] / "docs" / "callbacks.md").read_text()
    (config,) = re.findall(r"```yaml\n(.*?)```", page, re.S)
    path = tmp_path / "config.yaml"
    path.write_text(config)

    class Model(Net):
        def __init__(self):
            super().__init__(mlp())

    cli = LightningCLI(Model, run=False, save_config_callback=None,
                       args=["--config", str(path), "--trainer.logger=false"])
    callbacks = {type(cb): cb for cb in cli.trainer.callbacks}
    assert callbacks[AdversarialTraining].norm == "linf" and callbacks[AdversarialTraining].steps == 10
    assert callbacks[RobustAccuracy].attacks == ["apgd-ce", "apgd-t"] and callbacks[RobustAccuracy].every_n_epochs == 5
    assert callbacks[ModelCheckpoint].monitor == "robust/accuracy"
