"""GradientNormMonitor(mode="fused"): the per-sample norms read off the training step's own backward."""

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins import MixedPrecision

from lightning_gp.callbacks.data_penalty import DataGradientPenalty
from lightning_gp.monitors.gradient_norm import GradientNormMonitor
from lightning_gp.monitors.mlp_inequality import MLPInequalityMonitor
from tests.monitors.support import Classifier, loader, reference_norms, trainer

SCALARS = ("input_mean", "input_max", "param_per_sample_mean", "param_per_sample_max",
           "layer/net.0", "layer/net.2", "layer/net.4")


class Batches(pl.Callback):
    """Copies the module at the first micro-batch of optimizer step ``step`` and every batch of that step."""

    def __init__(self, step):
        self.step, self.model, self.batches = step, None, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            if self.model is None:
                self.model = copy.deepcopy(pl_module)
            self.batches.append(batch)


def _fused(**kwargs):
    return GradientNormMonitor(every_n_steps=2, histograms=False, mode="fused", **{"per_layer": True, **kwargs})


@pytest.mark.parametrize("accumulate", [1, 2])
def test_fused_values_equal_recompute_and_torch_func(tmp_path, accumulate):
    # The recompute monitor and an MLPInequalityMonitor run forward passes in on_train_batch_start *after*
    # the fused monitor's hook: the fused recording must cover the training step's forward only.
    recompute = GradientNormMonitor(per_layer=True, every_n_steps=2, histograms=False)
    fused, snap = _fused(), Batches(3)
    extra = MLPInequalityMonitor(every_n_steps=2, max_samples=4)
    trainer(tmp_path, callbacks=[fused, recompute, extra, snap], max_steps=4,
            accumulate_grad_batches=accumulate).fit(Classifier(), loader())
    assert fused.last_logged_step == recompute.last_logged_step == 3
    x = torch.cat([b[0] for b in snap.batches])
    y = torch.cat([b[1] for b in snap.batches])
    assert len(x) == 8 * accumulate  # every micro-batch of the due step is measured
    ref = reference_norms(snap.model, x, y)  # torch.func vmap(grad), on all samples of the step
    got = {k: fused.last_logged[f"grad_norm/{k}"] for k in SCALARS}
    expected = {
        "input_mean": ref["input"].mean(), "input_max": ref["input"].max(),
        "param_per_sample_mean": ref["param"].mean(), "param_per_sample_max": ref["param"].max(),
        **{f"layer/{n}": ref[f"layer/{n}"].mean() for n in ("net.0", "net.2", "net.4")},
    }
    assert got == pytest.approx({k: float(v) for k, v in expected.items()}, rel=1e-5)
    assert fused.last_logged["grad_norm/param_batch"] == recompute.last_logged["grad_norm/param_batch"]
    if accumulate == 1:  # the same samples as the default mode, which measures the first micro-batch
        assert fused.last_logged == pytest.approx(recompute.last_logged, rel=1e-5)


class SumLoss(Classifier):
    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y, reduction="sum")


def test_summed_loss():
    def run(module, **kwargs):
        torch.manual_seed(0)
        monitor = GradientNormMonitor(every_n_steps=1, histograms=False, mode="fused", **{"per_layer": True, **kwargs})
        trainer(None, callbacks=[monitor], max_steps=1).fit(module, loader())
        return monitor.last_logged

    torch.manual_seed(0)
    base = Classifier()
    mean = run(copy.deepcopy(base))
    summed = SumLoss()
    summed.load_state_dict(base.state_dict())
    got = run(summed, loss_reduction="sum")
    del mean["grad_norm/param_batch"], got["grad_norm/param_batch"]  # 8× larger for the summed loss
    assert got == pytest.approx(mean, rel=1e-5)


def _fit(tmp_path, callbacks, model, max_steps=4, **kwargs):
    torch.manual_seed(0)
    trainer(tmp_path, callbacks=callbacks, max_steps=max_steps, **kwargs).fit(model, loader())
    return model


def test_fused_monitor_never_changes_training(tmp_path):
    torch.manual_seed(0)
    base = Classifier(dropout=0.3)  # the fused monitor measures the training forward, dropout drawn once
    plain = _fit(tmp_path / "a", [], copy.deepcopy(base), accumulate_grad_batches=2)
    monitor = GradientNormMonitor(per_layer=True, every_n_steps=1, mode="fused")
    monitored = _fit(tmp_path / "b", [monitor], copy.deepcopy(base), accumulate_grad_batches=2)
    assert monitor.last_logged_step == 3 and monitor.last_logged["grad_norm/input_mean"] > 0
    for (name, a), b in zip(plain.state_dict().items(), monitored.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


class Inputs(pl.Callback):
    def __init__(self):
        self.inputs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.inputs.append(batch[0])


def _hooks(model):
    """Hooks on the model's modules, and instance ``forward`` s (how the fused monitor taps Linear layers)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) + ("forward" in m.__dict__) for m in model.modules())


@pytest.mark.parametrize("raise_at_call", [1, 2])
def test_nothing_is_left_behind_when_a_step_raises(tmp_path, raise_at_call):
    model, inputs = Classifier(raise_at_call=raise_at_call), Inputs()
    with pytest.raises(RuntimeError, match="boom"):
        _fit(tmp_path, [inputs, GradientNormMonitor(per_layer=True, every_n_steps=1, mode="fused")], model)
    assert len(inputs.inputs) == raise_at_call
    assert _hooks(model) == 0 and "training_step" not in model.__dict__
    assert all(not x.requires_grad and x.grad is None for x in inputs.inputs)
    assert all(p.requires_grad for p in model.parameters())


def test_nothing_is_left_behind_after_fit(tmp_path):
    model, inputs = Classifier(), Inputs()
    _fit(tmp_path, [inputs, GradientNormMonitor(per_layer=True, every_n_steps=1, mode="fused")], model, max_steps=2)
    assert _hooks(model) == 0 and "training_step" not in model.__dict__
    assert all(not x.requires_grad and x.grad is None for x in inputs.inputs)


def test_16_mixed_values_are_unscaled():
    def run(**kwargs):
        torch.manual_seed(0)
        monitor = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused")
        trainer(None, callbacks=[monitor], max_steps=1, **kwargs).fit(Classifier(), loader())
        return monitor.last_logged

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    amp = run(plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    full = run()
    assert scaler.get_scale() == 2.0**12  # the step was taken (no inf/NaN skipped it)
    assert amp == pytest.approx(full, rel=2e-2, abs=1e-4)  # not 4096 times larger


class Manual(Classifier):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_errors(tmp_path):
    ghost = r"^GradientNormMonitor\(mode='ghost'\): `mode` must be one of \['recompute', 'fused'\], got 'ghost'"
    with pytest.raises(ValueError, match=ghost):
        GradientNormMonitor(mode="ghost")
    with pytest.raises(ValueError, match=r"`loss_reduction` must be one of \['mean', 'sum'\], got 'none'"):
        GradientNormMonitor(mode="fused", loss_reduction="none")
    with pytest.raises(ValueError, match="`loss_fn` and `forward_fn` are not used with mode='fused'"):
        GradientNormMonitor(mode="fused", loss_fn=lambda out, batch: out.sum(1))
    with pytest.raises(ValueError, match=r"Module 'net.2' \(BatchNorm1d\) is in training mode.*mode='recompute'"):
        _fit(tmp_path, [_fused()], Classifier(batchnorm=True), max_steps=2)
    with pytest.raises(RuntimeError, match=r"DataGradientPenalty add\(s\) a penalty.*mode='recompute'"):
        _fit(tmp_path, [_fused(), DataGradientPenalty(0.1)], Classifier(), max_steps=1)
    with pytest.raises(RuntimeError, match=r"`Manual` uses manual optimization\. Use mode='recompute'"):
        _fit(tmp_path, [_fused()], Manual(), max_steps=1)
    # an input that input_key computes is not the tensor the model is fed
    with pytest.raises(RuntimeError, match=r"does not depend on the batch input .* stayed None"):
        _fit(tmp_path, [_fused(input_key=lambda b: b[0].clone())], Classifier(), max_steps=2)
    with pytest.raises(RuntimeError, match=r"must be a batch tensor that does not require grad.*is_leaf=False"):
        _fit(tmp_path, [_fused(input_key=lambda b: b[0] * torch.ones(1, requires_grad=True))], Classifier(),
             max_steps=2)


class LayerNormNet(Classifier):
    """A LayerNorm: no ghost norm, replayed by torch.func from the recorded inputs and output gradients."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                                       torch.nn.Linear(8, 3))


class Spare(Classifier):
    def __init__(self):
        super().__init__()
        self.spare = torch.nn.Linear(2, 2)  # never called: per-sample norm 0


class SharedWeight(Classifier):
    """The first layer's parameters are used without calling the layer."""

    def forward(self, x):
        first = self.net[0]
        return self.net[2:](torch.tanh(F.linear(x, first.weight, first.bias)))


def test_layers_without_ghost_norm():
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    trainer(None, callbacks=[fused, snap], max_steps=1).fit(LayerNormNet(), loader())
    (x, y), = snap.batches
    ref = reference_norms(snap.model, x, y)
    for layer in ("net.0", "net.1", "net.3"):
        assert fused.last_logged[f"grad_norm/layer/{layer}"] == pytest.approx(float(ref[f"layer/{layer}"].mean()),
                                                                             rel=1e-5)
    assert fused.last_logged["grad_norm/param_per_sample_max"] == pytest.approx(float(ref["param"].max()), rel=1e-5)


def test_unused_layer_has_norm_zero():
    fused = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused")
    recompute = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False)
    trainer(None, callbacks=[fused, recompute], max_steps=1).fit(Spare(), loader())
    assert fused.last_logged.pop("grad_norm/layer/spare") == 0
    # the default mode replays the unused layer's parameters through the module's forward: they sit in "_root"
    assert recompute.last_logged.pop("grad_norm/layer/_root") == 0
    assert fused.last_logged == pytest.approx(recompute.last_logged, rel=1e-5)


def test_parameters_used_outside_their_layer_raise():
    with pytest.raises(RuntimeError, match=r"parameters of layer 'net.0' \(Linear\) got a gradient although"):
        trainer(None, callbacks=[_fused()], max_steps=2).fit(SharedWeight(), loader())


class SharedAndSequence(Classifier):
    """One Linear applied twice (shared weights) and one applied to a sequence of 3 positions."""

    def __init__(self):
        super().__init__()
        self.expand = torch.nn.Linear(4, 3 * 4)  # (B, 4) → (B, 3, 4): a sequence for `seq`
        self.seq = torch.nn.Linear(4, 4)
        self.shared = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        s = torch.tanh(self.seq(torch.tanh(self.expand(x[:, :4])).reshape(-1, 3, 4))).mean(1)
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(s)))))


def test_fused_handles_shared_linear_layers_and_sequences():
    torch.manual_seed(0)
    module, snap = SharedAndSequence(), Batches(1)
    fused = GradientNormMonitor(per_layer=True, every_n_steps=2, histograms=False, mode="fused")
    trainer(None, callbacks=[fused, snap], max_steps=2).fit(module, loader())
    (x, y), = snap.batches
    ref = reference_norms(snap.model, x, y)  # torch.func vmap(grad): exact per-sample gradients
    for layer in ("expand", "seq", "shared", "head"):
        assert fused.last_logged[f"grad_norm/layer/{layer}"] == pytest.approx(float(ref[f"layer/{layer}"].mean()),
                                                                              rel=1e-5)
    assert fused.last_logged["grad_norm/param_per_sample_max"] == pytest.approx(float(ref["param"].max()), rel=1e-5)


class PositionsFirst(Classifier):
    """A layer applied to (positions, batch, features): the batch is not the first dimension."""

    def forward(self, x):
        h = torch.tanh(self.net[0](x))  # (B, 8)
        seq = self.net[2](h[None].expand(2, -1, -1))  # (2, B, 8)
        return self.net[4](torch.relu(seq.mean(0)))


def test_fused_rejects_a_layer_without_the_batch_first():
    fused = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused")
    with pytest.raises(RuntimeError, match=r"layer 'net.2' ran on an input of shape \(2, 8, 8\)"):
        trainer(None, callbacks=[fused], max_steps=1).fit(PositionsFirst(), loader())


def test_fused_keeps_float64_precision():
    torch.manual_seed(0)
    module, snap = Classifier(), Batches(1)
    fused = GradientNormMonitor(per_layer=True, every_n_steps=2, histograms=False, mode="fused")
    trainer(None, callbacks=[fused, snap], max_steps=2, precision="64-true").fit(module, loader())
    (x, y), = snap.batches
    assert x.dtype == torch.float64
    ref = reference_norms(snap.model, x, y)
    # Nothing is rounded to float32 on the way, the metric's reduction included.
    assert fused.last_logged["grad_norm/layer/net.2"] == pytest.approx(float(ref["layer/net.2"].mean()), rel=1e-12)
    assert fused.last_logged["grad_norm/input_max"] == pytest.approx(float(ref["input"].max()), rel=1e-12)


def _expected(ref):
    return {
        "input_mean": ref["input"].mean(), "input_max": ref["input"].max(),
        "param_per_sample_mean": ref["param"].mean(), "param_per_sample_max": ref["param"].max(),
        **{f"layer/{n}": ref[f"layer/{n}"].mean() for n in ("net.0", "net.2", "net.4")},
    }


def test_micro_batches_of_different_sizes():
    # 12 samples in batches of 8: the one optimizer step accumulates micro-batches of 8 and 4 samples, whose
    # recorded gradients carry different factors (1/(B·k) with B = 8 and 4)
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    trainer(None, callbacks=[fused, snap], max_steps=1, accumulate_grad_batches=2).fit(Classifier(), loader(n=12))
    x, y = torch.cat([b[0] for b in snap.batches]), torch.cat([b[1] for b in snap.batches])
    assert len(x) == 12
    ref = reference_norms(snap.model, x, y)
    got = {k: fused.last_logged[f"grad_norm/{k}"] for k in SCALARS}
    assert got == pytest.approx({k: float(v) for k, v in _expected(ref).items()}, rel=1e-5)


class Frozen(Classifier):
    """The first layer's bias and the last layer's weight do not train."""

    def __init__(self):
        super().__init__()
        self.net[0].bias.requires_grad_(False)
        self.net[4].weight.requires_grad_(False)


def test_frozen_weight_or_bias():
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    trainer(None, callbacks=[fused, snap], max_steps=1).fit(Frozen(), loader())
    (x, y), = snap.batches
    ref = reference_norms(snap.model, x, y)  # all parameters: the frozen ones' norms are taken out below
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in snap.model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(snap.model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    norm = lambda *keys: torch.cat([g[k].reshape(len(x), -1) for k in keys], 1).norm(dim=1)  # noqa: E731
    expected = {"layer/net.0": norm("net.0.weight"), "layer/net.2": norm("net.2.weight", "net.2.bias"),
                "layer/net.4": norm("net.4.bias"),
                "param_per_sample_max": norm("net.0.weight", "net.2.weight", "net.2.bias", "net.4.bias")}
    for key, value in expected.items():
        reduce = torch.max if key.endswith("max") else torch.mean
        assert fused.last_logged[f"grad_norm/{key}"] == pytest.approx(float(reduce(value)), rel=1e-5), key
    assert fused.last_logged["grad_norm/input_max"] == pytest.approx(float(ref["input"].max()), rel=1e-5)


class HookCount(pl.Callback):
    """The number of hooks and tapped layers on the module while each training step's backward starts."""

    def __init__(self):
        self.counts = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.counts.append(_hooks(pl_module))


@pytest.mark.parametrize("every", [1, 2])
def test_layer_hooks_are_on_only_over_consecutive_monitored_steps(every):
    model, count = Classifier(), HookCount()
    _fit(None, [GradientNormMonitor(per_layer=True, every_n_steps=every, mode="fused"), count], model, max_steps=5)
    on = [3 if (step + 1) % every == 0 else 0 for step in range(5)]  # the three Linear layers tapped
    assert count.counts == on
    assert _hooks(model) == 0


class DifferentiatesTwice(Classifier):
    """A training step that differentiates through the model itself before Lightning's backward."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        (g,) = torch.autograd.grad(loss, self.net[0].weight, create_graph=True)
        return loss + g.square().sum()


def test_a_second_gradient_through_the_layers_raises():
    with pytest.raises(RuntimeError, match=r"received a second gradient: `training_step` differentiates"):
        _fit(None, [_fused()], DifferentiatesTwice(), max_steps=2)


class InPlaceAfterLayer(Classifier):
    """The input of the second layer is modified in place after that layer ran."""

    def forward(self, x):
        h = torch.tanh(self.net[0](x))
        out = self.net[2](h)
        h.mul_(2.0)
        return self.net[4](torch.relu(out))


def test_an_input_modified_in_place_after_its_layer_raises():
    with pytest.raises(RuntimeError, match=r"input of layer 'net.2' was modified in place after the layer ran"):
        _fit(None, [GradientNormMonitor(every_n_steps=1, mode="fused")], InPlaceAfterLayer(), max_steps=1)


class CopiesItself(Classifier):
    """A training step that also runs a deep copy of the model (as an EMA or SWA copy would be made)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.copies = [copy.deepcopy(self.net)]  # made while the layers are tapped (a list: not a submodule)
        # the copy's term reaches neither x nor the model's parameters: if the copy's calls were recorded as
        # the original layers', their gradients would show in the layers' per-sample norms
        return F.cross_entropy(self(x), y) + self.copies[0](x.detach()).square().mean()


def test_a_deep_copy_of_a_tapped_layer_is_not_recorded_and_computes_as_linear():
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    module = CopiesItself()
    trainer(None, callbacks=[fused, snap], max_steps=1).fit(module, loader())
    (x, y), = snap.batches
    ref = reference_norms(snap.model, x, y)
    got = {k: fused.last_logged[f"grad_norm/{k}"] for k in SCALARS}  # the copy's calls would add to these
    assert got == pytest.approx({k: float(v) for k, v in _expected(ref).items()}, rel=1e-5)
    plain = torch.nn.Sequential(*[type(m)(*m.weight.shape[::-1]) if isinstance(m, torch.nn.Linear) else m
                                  for m in module.copies[0]])
    plain.load_state_dict(module.copies[0].state_dict())
    torch.testing.assert_close(module.copies[0](x), plain(x))  # the copy's forward is nn.Linear's


def test_fused_without_per_layer_norms():
    def run(**kwargs):
        torch.manual_seed(0)
        monitor = GradientNormMonitor(every_n_steps=1, histograms=False, mode="fused", **{"per_layer": True, **kwargs})
        trainer(None, callbacks=[monitor], max_steps=1).fit(Classifier(), loader())
        return monitor.last_logged

    full, short = run(), run(per_layer=False)
    assert not any(k.startswith("grad_norm/layer/") for k in short)
    assert short == pytest.approx({k: v for k, v in full.items() if not k.startswith("grad_norm/layer/")}, rel=1e-6)
