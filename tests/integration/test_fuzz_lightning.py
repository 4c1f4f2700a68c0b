"""Fuzz and property suite of the Lightning layer (issue 12): every argument of every callback, the mixin
and the monitors, and faults inside ``fit``.

Each case ends in one of two outcomes: a clear error naming the argument (or the callback and the step),
the bad value and the fix; or the right answer, checked against an independent computation.
"""

from __future__ import annotations

import ast
import math
import re

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import (
    GradientNormMonitor,
    MLPInequalityMonitor,
    SharpnessAwareMinimization,
    SharpnessMonitor,
    SpectralNormMonitor,
)
from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    ParameterGradientPenalty,
    SpectralNormPenalty,
    VirtualAdversarialTraining,
)
from lightning_gp.gan import WGANGPMixin
from lightning_gp.manual import penalized_loss
from lightning_gp.step._finite import StepValues, check_step

QUIET = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False)
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10),
                    st.sampled_from([0.0, -0.0, 1.0, 1e-300, -1e-300, 1e300, math.inf, -math.inf, math.nan]))


# ------------------------------------------------------------------------------------------- arguments
class _GAN(WGANGPMixin, pl.LightningModule):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.generator, self.critic = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)

    def sample_latent(self, n):
        return torch.randn(n, 3, device=self.device)


#: (constructor, argument, low, strict, high): a finite number in [low, high] (low excluded when strict).
REAL_ARGS = [
    (lambda **kw: DataGradientPenalty(**{"weight": 1.0, **kw}), "weight", 0.0, False, None),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "power", 1.0, False, None),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "center", 0.0, False, None),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "step", 0.0, True, None),
    (lambda **kw: ParameterGradientPenalty(**{"weight": 1.0, **kw}), "weight", 0.0, False, None),
    (lambda **kw: ParameterGradientPenalty(1.0, **kw), "step", 0.0, True, None),
    (lambda **kw: SpectralNormPenalty(**{"weight": 1.0, **kw}), "weight", 0.0, False, None),
    (lambda **kw: AdversarialTraining(**{"epsilon": 0.1, **kw}), "epsilon", 0.0, False, None),
    (lambda **kw: AdversarialTraining(0.1, **kw), "step_size", 0.0, True, None),
    (lambda **kw: AdversarialTraining(0.1, **kw), "adversarial_weight", 0.0, False, 1.0),
    (lambda **kw: VirtualAdversarialTraining(**{"epsilon": 1.0, **kw}), "epsilon", 0.0, True, None),
    (lambda **kw: VirtualAdversarialTraining(1.0, **kw), "xi", 0.0, True, None),
    (lambda **kw: VirtualAdversarialTraining(1.0, **kw), "weight", 0.0, False, None),
    (lambda **kw: Flooding(**{"level": 0.1, **kw}), "level", 0.0, False, None),
    (lambda **kw: _GAN(**kw), "gp_weight", 0.0, False, None),
    (lambda **kw: _GAN(**kw), "clip_value", 0.0, True, None),
    (lambda **kw: _GAN(**kw), "lr", 0.0, True, None),
]


def _valid(value, low, strict, high) -> bool:
    if isinstance(value, bool) or not math.isfinite(value):
        return False
    return (value > low if strict else value >= low) and (high is None or value <= high)


@pytest.mark.parametrize(("make", "name", "low", "strict", "high"), REAL_ARGS,
                         ids=[f"{i}-{a[1]}" for i, a in enumerate(REAL_ARGS)])
@settings(max_examples=25, deadline=None)
@given(value=NUMBERS)
def test_real_arguments_accept_finite_in_range_and_name_everything_else(make, name, low, strict, high, value):
    if _valid(value, low, strict, high):
        obj = make(**{name: value})
        stored = obj.wgan_hparams[name] if isinstance(obj, _GAN) else getattr(obj, name)
        assert stored == float(value)
        return
    with pytest.raises(ValueError, match=rf"`{name}` must be .*got {re.escape(repr(value))}"):
        make(**{name: value})


@pytest.mark.parametrize(("make", "name"), [(m, n) for m, n, *_ in REAL_ARGS])
@pytest.mark.parametrize("bad", ["0.1", None, True, torch.tensor(0.5), [0.1]], ids=str)
def test_real_arguments_refuse_other_types(make, name, bad):
    if bad is None and name in ("step_size", "xi", "step"):
        return  # None is their default (chosen from ε, or from the dtype the passes compute in)
    with pytest.raises((TypeError, ValueError), match=rf"`{name}` must be"):
        make(**{name: bad})


INT_ARGS = [
    (lambda **kw: DataGradientPenalty(1.0, **kw), "every_n_steps"),
    (lambda **kw: ParameterGradientPenalty(1.0, **kw), "every_n_steps"),
    (lambda **kw: SpectralNormPenalty(1.0, **kw), "n_iter"),
    (lambda **kw: AdversarialTraining(0.1, **kw), "steps"),
    (lambda **kw: VirtualAdversarialTraining(1.0, **kw), "power_iterations"),
    (lambda **kw: _GAN(**kw), "n_critic"),
    (lambda **kw: _GAN(**kw), "reg_every"),
    (lambda **kw: GradientNormMonitor(**kw), "every_n_steps"),
    (lambda **kw: MLPInequalityMonitor(**kw), "every_n_steps"),
    (lambda **kw: MLPInequalityMonitor(**kw), "max_samples"),
    (lambda **kw: SpectralNormMonitor(**kw), "every_n_steps"),
    (lambda **kw: SpectralNormMonitor(**kw), "n_iter"),
    (lambda **kw: SharpnessAwareMinimization(**kw), "every_n_steps"),
    (lambda **kw: SharpnessMonitor(**kw), "every_n_steps"),
    (lambda **kw: SharpnessMonitor(**kw), "iterations"),
    (lambda **kw: SharpnessMonitor(**kw), "trace_samples"),
]


@pytest.mark.parametrize(("make", "name"), INT_ARGS, ids=[f"{i}-{a[1]}" for i, a in enumerate(INT_ARGS)])
@settings(max_examples=15, deadline=None)
@given(value=st.one_of(st.integers(-5, 5), st.sampled_from([1.0, 2.5, math.inf, math.nan, "3", True])))
def test_integer_arguments(make, name, value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        make(**{name: value})
        return
    shown = re.escape(repr(value))
    # the class and the argument first, as every other argument error of a callback or monitor
    with pytest.raises(ValueError, match=rf"^\w+\({name}={shown}\): `{name}` must be an integer >= 1, got {shown}"):
        make(**{name: value})


CHOICES = [
    (lambda **kw: DataGradientPenalty(1.0, **kw), "method"),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "loss_reduction"),
    (lambda **kw: ParameterGradientPenalty(1.0, **kw), "method"),
    (lambda **kw: ParameterGradientPenalty(1.0, **kw), "scope"),
    (lambda **kw: AdversarialTraining(0.1, **kw), "norm"),
    (lambda **kw: _GAN(**kw), "regularizer"),
    (lambda **kw: _GAN(**kw), "method"),
    (lambda **kw: GradientNormMonitor(**kw), "mode"),
    (lambda **kw: GradientNormMonitor(**kw), "loss_reduction"),
    (lambda **kw: SharpnessAwareMinimization(**kw), "scope"),
    (lambda **kw: SharpnessMonitor(**kw), "method"),
]


@pytest.mark.parametrize(("make", "name"), CHOICES, ids=[f"{i}-{a[1]}" for i, a in enumerate(CHOICES)])
@pytest.mark.parametrize("bad", ["nope", "", None, 1])
def test_choice_arguments_list_the_choices(make, name, bad):
    shown = re.escape(repr(bad))
    with pytest.raises(ValueError, match=rf"^\w+\({name}={shown}\): `{name}` must be one of .*got {shown}\.$"):
        make(**{name: bad})


@pytest.mark.parametrize(("make", "name"), CHOICES, ids=[f"{i}-{a[1]}" for i, a in enumerate(CHOICES)])
def test_a_choice_in_the_wrong_case_or_with_a_hyphen_is_pointed_to(make, name):
    choices = re.search(r"must be one of (\[.*?\])", _error(make, name, "nope")).group(1)
    for choice in ast.literal_eval(choices):  # the listed choices, e.g. ['l2', 'linf']
        typo = choice.upper().replace("_", "-")
        assert _error(make, name, typo).endswith(f"Did you mean {choice!r}?")


def _error(make, name, value) -> str:
    with pytest.raises(ValueError) as info:
        make(**{name: value})
    return str(info.value)


BOOLS = [
    (lambda **kw: DataGradientPenalty(1.0, **kw), "one_sided"),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "check_finite"),
    (lambda **kw: DataGradientPenalty(1.0, **kw), "check_reduction"),
    (lambda **kw: ParameterGradientPenalty(1.0, **kw), "check_finite"),
    (lambda **kw: SpectralNormPenalty(1.0, **kw), "check_finite"),
    (lambda **kw: AdversarialTraining(0.1, **kw), "random_start"),
    (lambda **kw: AdversarialTraining(0.1, **kw), "average_steps"),
    (lambda **kw: AdversarialTraining(0.1, **kw), "check_finite"),
    (lambda **kw: VirtualAdversarialTraining(0.1, **kw), "check_finite"),
    (lambda **kw: Flooding(0.1, **kw), "check_finite"),
]


@pytest.mark.parametrize(("make", "name"), BOOLS, ids=[f"{i}-{a[1]}" for i, a in enumerate(BOOLS)])
@pytest.mark.parametrize("bad", ["False", 0, None])
def test_bool_arguments_refuse_lookalikes(make, name, bad):
    with pytest.raises(TypeError, match=rf"`{name}` must be True or False, got {type(bad).__name__}"):
        make(**{name: bad})


@pytest.mark.parametrize(("make", "match"), [
    (lambda: AdversarialTraining(0.1, steps=5, step_size=0), r"`step_size` must be a positive number, got 0.*"
                                                             r"never moves the input.*step_size=None"),
    (lambda: AdversarialTraining(0.1, step_size=0.0), r"`step_size` must be a positive number"),
    (lambda: AdversarialTraining(0.1, clamp=(1, 0)), r"`clamp` must satisfy lo < hi"),
    (lambda: AdversarialTraining(0.1, clamp=(math.nan, 1)), r"`clamp` must satisfy lo < hi"),
    (lambda: AdversarialTraining(0.1, clamp="01"), r"`clamp` must be a pair"),
    (lambda: AdversarialTraining(0.1, target="net", clamp=(0, 1)), r"has no valid range. Drop `clamp`"),
    (lambda: AdversarialTraining(0.1, average_steps=True, adversarial_weight=0.5), r"takes no `adversarial_weight`"),
    (lambda: VirtualAdversarialTraining(1.0, logits_fn=3), r"`logits_fn` must be callable"),
    (lambda: GradientNormMonitor(loss_fn="ce"), r"`loss_fn` must be callable"),
    (lambda: GradientNormMonitor(mode="fused", loss_fn=lambda o, b: o),
     r"`loss_fn` and `forward_fn` are not used with mode='fused'"),
    (lambda: MLPInequalityMonitor(loss_fn=1), r"`loss_fn` must be callable"),
    (lambda: MLPInequalityMonitor(submodule=1), r"`submodule` must be a dotted module name"),
    (lambda: _GAN(betas=(0.5, math.inf)), r"`betas` must be two numbers in \[0, 1\)"),
    (lambda: _GAN(betas=(0.5, math.nan)), r"`betas` must be two numbers in \[0, 1\)"),
    (lambda: _GAN(n_critics=5), r"_GAN: unknown argument 'n_critics'; did you mean 'n_critic'\?"),
    (lambda: _GAN(gp_wieght=5), r"unknown argument 'gp_wieght'; did you mean 'gp_weight'\?"),
    (lambda: _GAN(frobnicate=1), r"unknown argument 'frobnicate'. WGANGPMixin's own arguments"),
])
def test_meaningless_settings_are_refused(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


# ---------------------------------------------------------------------------------------- in `fit`
class Net(pl.LightningModule):
    def __init__(self, fault=None, width: int = 6, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(width, 3))
        self.fault = fault

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        if self.fault is not None:
            loss = self.fault(self, loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def loader(n=8, batch=4, nan_at=None, value=math.nan):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(n, 4, generator=gen)
    if nan_at is not None:
        x[nan_at, 1] = value
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (n,), generator=gen)), batch_size=batch)


def fit(module, callbacks, data=None, steps=2, **kwargs):
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, **{**QUIET, **kwargs})
    trainer.fit(module, data if data is not None else loader())
    return trainer


def left_behind(module) -> list[str]:
    """What a failed fit must not leave: the wrapper, hooks, frozen or unfrozen flags."""
    out = []
    if "training_step" in module.__dict__ or "_lightning_gp_interceptor" in module.__dict__:
        out.append("wrapper")
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks:
            out.append(f"hooks on {name!r}")
        if "log" in m.__dict__:
            out.append(f"muted log on {name!r}")
    out += [n for n, p in module.named_parameters() if not p.requires_grad]
    return out


EVERY_CALLBACK = {
    "data_center": lambda: [DataGradientPenalty(1.0, center=1.0)],
    "data": lambda: [DataGradientPenalty(1.0)],
    "data_power1_fd": lambda: [DataGradientPenalty(1.0, power=1, method="finite_difference")],
    "data_one_sided": lambda: [DataGradientPenalty(1.0, center=1.0, one_sided=True)],
    "parameter": lambda: [ParameterGradientPenalty(0.1)],
    "parameter_fd": lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
    "spectral": lambda: [SpectralNormPenalty(0.1)],
    "adversarial": lambda: [AdversarialTraining(0.1)],
    "adversarial_half": lambda: [AdversarialTraining(0.1, adversarial_weight=0.5)],
    "pgd_random": lambda: [AdversarialTraining(0.1, norm="linf", steps=3, random_start=True)],
    "freelb": lambda: [AdversarialTraining(0.1, steps=2, average_steps=True)],
    "vat": lambda: [VirtualAdversarialTraining(1.0)],
    "flooding": lambda: [Flooding(0.5)],
    "all": lambda: [Flooding(0.1), AdversarialTraining(0.1), DataGradientPenalty(0.5, center=1.0),
                    ParameterGradientPenalty(0.1), SpectralNormPenalty(0.1), VirtualAdversarialTraining(1.0)],
}


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("name", list(EVERY_CALLBACK))
def test_a_non_finite_sample_stops_fit_before_the_parameters_change(name, value):
    """One NaN/Inf sample in the second batch: the error names the step and the sample, the parameters are
    those after the first step (finite), and nothing is left on the module."""
    module = Net()
    fit(module, EVERY_CALLBACK[name](), steps=1)  # the reference: one clean step
    after_one = {k: v.clone() for k, v in module.state_dict().items()}
    module = Net()
    with pytest.raises(FloatingPointError, match=r"at global step 1.*Non-finite values in the batch: batch\[0\] "
                                                 r"\(shape \[4, 4\]\), samples \[1\].*parameters were not updated"):
        fit(module, EVERY_CALLBACK[name](), loader(nan_at=5, value=value))
    for key, tensor in module.state_dict().items():
        assert torch.equal(tensor, after_one[key]), key
    assert left_behind(module) == []


def test_a_finite_penalty_with_a_nan_gradient_is_caught():
    """The gradient check, not the value: a term with value 0 and a NaN gradient (torch.where's masked branch)."""
    def nan_gradient(m, loss):
        w = m.net[0].weight
        return loss + torch.where(torch.zeros((), dtype=torch.bool), (-w.abs() - 1).sqrt(), 0).sum()

    module = Net(nan_gradient)
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"DataGradientPenalty: the gradient is non-finite at global step 0 "
                                                 r"although the loss and every penalty are finite.*'net.0.weight'"):
        fit(module, [DataGradientPenalty(1.0, center=1.0)])
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())


def test_a_nan_loss_from_the_user_is_attributed_to_the_loss_at_its_step():
    def nan_at_step_2(m, loss):
        return loss * math.nan if m.global_step == 2 else loss

    with pytest.raises(FloatingPointError, match=r"The loss returned by `training_step` is nan at global step 2: it "
                                                 r"is non-finite before ParameterGradientPenalty adds anything"):
        fit(Net(nan_at_step_2), [ParameterGradientPenalty(0.1)], loader(n=16), steps=4)


@pytest.mark.parametrize("make", [lambda: DataGradientPenalty(1.0, check_finite=False),
                                  lambda: AdversarialTraining(0.1, check_finite=False),
                                  lambda: Flooding(0.1, check_finite=False)], ids=["data", "adversarial", "flooding"])
def test_check_finite_false_turns_the_check_off(make):
    module = Net()
    fit(module, [make()], loader(nan_at=5))
    assert not all(bool(p.isfinite().all()) for p in module.parameters())


@pytest.mark.parametrize("name", ["data", "parameter_fd", "pgd_random", "vat", "all"])
def test_an_exception_in_training_step_at_step_k_leaves_nothing_behind(name):
    def boom(m, loss):
        if m.global_step == 1:
            raise KeyError("user bug")
        return loss

    module = Net(boom, dropout=0.2)
    with pytest.raises(KeyError, match="user bug"):
        fit(module, EVERY_CALLBACK[name](), steps=3)
    assert left_behind(module) == []


def test_gradscaler_inf_gradients_are_the_scalers_but_a_nan_penalty_is_raised():
    """16-mixed: an overflowing scaled backward makes inf gradients, the scaler skips the step (no error);
    a NaN in an unscaled value is no scaling artifact and is raised."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)
    module = Net()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    fit(module, [DataGradientPenalty(0.5)], steps=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert scaler.get_scale() < 2.0**100  # the step was skipped by the scaler
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    with pytest.raises(FloatingPointError, match=r"DataGradientPenalty: `penalty/data_gradient` is nan"):
        fit(Net(), [DataGradientPenalty(0.5)], loader(nan_at=1), steps=1,
            plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])


def test_check_step_is_one_host_read_and_classifies():
    grads = [torch.ones(3), torch.full((2,), math.inf)]
    values = StepValues()
    values.add_loss(torch.tensor(1.0))
    values.add("X", "penalty/x", torch.tensor(2.0))
    check_step(values, grads[:1], step=0)  # finite: silent
    with pytest.raises(FloatingPointError, match="gradient is non-finite"):
        check_step(values, grads, step=0, grad_names=["a", "b"])
    check_step(values, grads, step=0, scaled=True)  # the scaler's business
    values.add("X", "penalty/x", torch.tensor(math.inf))
    check_step(values, grads[:1], step=0, scaled=True)  # an inf value under a scaler: a possible fp16 overflow
    values.add("X", "penalty/y", torch.tensor(math.nan))
    with pytest.raises(FloatingPointError, match=r"X: `penalty/y` is nan"):
        check_step(values, grads[:1], step=0, scaled=True)


@pytest.mark.parametrize("name", list(EVERY_CALLBACK))
def test_batch_of_one_sample_trains_to_finite_parameters(name):
    module = Net()
    fit(module, EVERY_CALLBACK[name](), loader(n=2, batch=1))
    assert all(bool(p.isfinite().all()) for p in module.parameters())


class Frozen(Net):
    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)


@pytest.mark.parametrize("name", ["data", "parameter", "parameter_fd", "spectral", "adversarial", "vat"])
def test_a_partly_frozen_model_keeps_its_frozen_layer(name):
    module = Frozen()
    frozen = module.net[0].weight.clone()
    fit(module, EVERY_CALLBACK[name]())
    assert torch.equal(module.net[0].weight, frozen) and not module.net[0].weight.requires_grad


def test_two_data_penalties_compose_as_the_sum_of_their_terms():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))

    def loss_fn(b):
        return F.cross_entropy(net(b[0]), b[1])

    both = penalized_loss(net, loss_fn, (x, y), [DataGradientPenalty(1.0), DataGradientPenalty(0.5, power=1)])
    xl = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(xl), y, reduction="sum"), xl)  # per-sample ∇ₓℓᵢ (rows)
    norms = g.norm(dim=1)
    expected = loss_fn((x, y)) + norms.square().mean() + 0.5 * norms.mean()
    torch.testing.assert_close(both, expected, rtol=1e-5, atol=1e-6)
    # In a Trainer their forms give them two logged names and two checkpoint keys; the same form twice on the
    # same input is refused by Lightning (one state key).
    squared, linear = DataGradientPenalty(1.0), DataGradientPenalty(0.5, power=1)
    assert (squared.log_name, linear.log_name) == ("penalty/data_gradient", "penalty/data_gradient/power=1")
    trainer = fit(Net(), [squared, linear])
    assert {"penalty/data_gradient_epoch", "penalty/data_gradient/power=1_epoch"} <= set(trainer.callback_metrics)
    with pytest.raises(RuntimeError, match="state_key"):
        fit(Net(), [DataGradientPenalty(1.0), DataGradientPenalty(0.5)])


def test_a_reused_spectral_penalty_and_monitor_follow_a_wider_model():
    penalty, monitor = SpectralNormPenalty(0.1), SpectralNormMonitor(every_n_steps=1)
    fit(Net(), [penalty, monitor])
    wide = Net(width=16)
    sigma = torch.linalg.matrix_norm(wide.net[0].weight.detach(), ord=2)  # measured before the step
    fit(wide, [penalty, monitor], steps=1)
    assert penalty.vectors["net.0"].shape == (16,)
    assert abs(monitor.last_logged["lipschitz/sigma/net.0"] - float(sigma)) < 1e-2 * float(sigma)


class NoForward(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 3))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_module_without_forward_is_named_in_setup():
    with pytest.raises(NotImplementedError, match=r"GradientNormMonitor\(loss_fn=...\) calls `NoForward\(inputs\)`"
                                                  r", but `NoForward` defines no `forward`.*drop `loss_fn`"):
        fit(NoForward(), [GradientNormMonitor(every_n_steps=1, loss_fn=lambda out, b: out.sum(1))])
    module = NoForward()  # without loss_fn the monitor measures training_step: no forward needed
    fit(module, [GradientNormMonitor(every_n_steps=1)])
    with pytest.raises(NotImplementedError, match=r"defines no `forward`.*pass `logits_fn="):
        fit(NoForward(), [VirtualAdversarialTraining(1.0)])
    module = NoForward()  # with logits_fn, VAT needs no forward
    fit(module, [VirtualAdversarialTraining(1.0, logits_fn=lambda m, b: m.net(b[0]))])
    assert left_behind(module) == []


# -------------------------------------------------------------------------------------------- the mixin
def test_mixin_stops_on_a_nan_real_sample_and_reads_dict_batches():
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(32, 2, generator=gen)
    data[10, 0] = math.nan  # batch 1 (batch size 8)
    gan = _GAN(n_critic=2)
    with pytest.raises(FloatingPointError, match=r"WGANGPMixin, critic step 1: The critic loss .* is nan.*samples "
                                                 r"\[2\]"):
        fit(gan, [], DataLoader(data, batch_size=8), steps=6)
    assert all(bool(p.isfinite().all()) for p in gan.parameters())

    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 16

        def __getitem__(self, i):
            return {"x": torch.randn(2)}

    gan = _GAN(n_critic=2)
    fit(gan, [], DataLoader(Dicts(), batch_size=8), steps=3)
    assert gan.critic_steps == 2


# --------------------------------------------------------------------------------------------- resume
def test_resume_with_vat_and_random_start_pgd_is_bit_identical(tmp_path):
    """Every random draw of the package is a function of (initial seed, rank, step, micro-batch); with no
    dropout in the model a resumed run is bit-identical to the uninterrupted one."""
    def run(epochs, ckpt=None, save=None):
        pl.seed_everything(0, verbose=False)
        callbacks = [VirtualAdversarialTraining(1.0), AdversarialTraining(0.2, steps=2, random_start=True)]
        trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, precision="64-true", default_root_dir=tmp_path,
                             **QUIET)
        module = Net().double()  # built in float64: a float32 model under "64-true" resumes ~1e-8 off, callbacks or not
        trainer.fit(module, loader(n=8, batch=4), ckpt_path=ckpt)
        if save:
            trainer.save_checkpoint(save)
        return module

    full = run(2)
    run(1, save=tmp_path / "half.ckpt")
    resumed = run(2, ckpt=tmp_path / "half.ckpt")
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# ------------------------------------------------------------------------------------------------ DDP
@pytest.mark.ddp
def test_a_nan_on_one_rank_makes_every_rank_raise(tmp_path):
    from tests.ddp import run_ddp_script

    run_ddp_script("nonfinite_ddp.py", tmp_path / "out.pt", timeout=200)
    ranks = [torch.load(f"{tmp_path / 'out.pt'}.rank{r}", weights_only=False) for r in (0, 1)]
    expect_rank1 = {
        "data_center": r"The loss returned by `training_step` is nan at global step 1 on rank 1.*samples \[1\]",
        "adversarial": r"The loss returned by `training_step` is nan at global step 1 on rank 1",
        "nan_gradient": r"the gradient is non-finite at global step 1 although",
        "nan_constant": r"The loss returned by `training_step` is nan at global step 1 on rank 1",
        "wgan": r"WGANGPMixin, critic step 1: The critic loss .* is nan at global step 1 on rank 1",
    }
    for case, pattern in expect_rank1.items():
        for rank, results in enumerate(ranks):
            r = results[case]
            assert r["error"] is not None, (case, rank)
            assert r["global_step"] == 1 and r["finite"] and not r["wrapped"], (case, rank, r)
        assert re.search(pattern, ranks[1][case]["error"]), (case, ranks[1][case]["error"])
        if case != "nan_gradient":  # rank 0's own values were finite: it names rank 1
            assert re.search(r"rank\(s\) \[1\] had a non-finite loss or penalty at global step 1",
                             ranks[0][case]["error"]), (case, ranks[0][case]["error"])


def test_check_step_reads_the_host_once_on_a_finite_step(monkeypatch):
    """The finite path of the check makes one host read (`bool` of one flag tensor), whatever the number of
    gradients and values: counted by wrapping every Tensor → Python conversion."""
    reads = []
    for name in ("__bool__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    values = StepValues()
    for i in range(5):
        values.add_loss(torch.tensor(float(i)))
        values.add("X", f"penalty/{i}", torch.tensor(1.0))
    check_step(values, [torch.randn(3, 3) for _ in range(7)], step=0)
    assert reads == ["__bool__"]


def test_with_gradient_accumulation_the_check_covers_every_micro_batch():
    module = Net()
    start = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"at global step 0.*samples \[1\]"):
        fit(module, [DataGradientPenalty(1.0, center=1.0)], loader(nan_at=5), accumulate_grad_batches=2)
    assert all(torch.equal(v, start[k]) for k, v in module.state_dict().items())


SITE_CALLBACKS = {
    "DataGradientPenalty": lambda **kw: DataGradientPenalty(1.0, **kw),
    "AdversarialTraining": lambda **kw: AdversarialTraining(0.1, **kw),
    "VirtualAdversarialTraining": lambda **kw: VirtualAdversarialTraining(1.0, **kw),
    "GradientNormMonitor": lambda **kw: GradientNormMonitor(every_n_steps=1, **kw),
}


@pytest.mark.parametrize("owner", list(SITE_CALLBACKS))
@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(target=5), TypeError, r"`target` must be None, a dotted module path or an nn.Module, got int"),
    (dict(target="nett"), ValueError, r"`target='nett'` is not a submodule of `Net`. Nearest module names: \['net'"),
    (dict(input_key=3.5), ValueError, r"input_key=3.5\)` cannot be resolved in the batch"),
    (dict(input_key=1), TypeError, r"input_key=1`.*has dtype torch.int64 \(token ids\?.*`target=`"),
    (dict(mask_key="m"), ValueError, r"`mask_key='m'` is not a key of the batch"),
], ids=["target-int", "target-typo", "input_key-float", "input_key-labels", "mask_key"])
def test_site_arguments_fail_with_the_argument_and_the_fix(owner, kwargs, error, match):
    if owner == "GradientNormMonitor" and "mask_key" in kwargs:
        kwargs = {**kwargs, "target": "net.0"}  # the monitor reads a mask only for a layer target
    module = Net()
    with pytest.raises(error, match=match):
        fit(module, [SITE_CALLBACKS[owner](**kwargs)], steps=1)
    assert left_behind(module) == []


@pytest.mark.parametrize("fail", [False, True])
def test_the_package_draws_nothing_from_the_global_rng(fail):
    """Attack starts and VAT directions come from step-seeded generators, the reduction check runs on a forked
    stream and the finite differences replay theirs: on a model without random layers, after a fit (or a fit
    that failed at step 1) the global RNG is where the same fit without the callbacks leaves it. (With dropout,
    the extra passes of the attack and of VAT draw their masks from the global RNG, as the user's step does.)"""
    def boom(m, loss):
        if fail and m.global_step == 1:
            raise KeyError("user bug")
        return loss

    def state_after(callbacks):
        pl.seed_everything(0, verbose=False)
        with pytest.raises(KeyError) if fail else torch.enable_grad():
            fit(Net(boom), callbacks, steps=2)
        return torch.get_rng_state()

    plain = state_after([])
    with_package = state_after([AdversarialTraining(0.1, steps=2, random_start=True), VirtualAdversarialTraining(1.0),
                                DataGradientPenalty(0.5, method="finite_difference"), SpectralNormPenalty(0.1),
                                ParameterGradientPenalty(0.1, method="finite_difference")])
    assert torch.equal(plain, with_package)


@pytest.mark.parametrize("layout", ["channels_last", "non_contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_memory_layouts_and_dtypes_give_the_contiguous_answer(layout, dtype):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3)).to(dtype)
    x, y = torch.randn(5, 3, 6, 6, dtype=dtype), torch.randint(0, 3, (5,))
    if layout == "channels_last":
        laid = x.to(memory_format=torch.channels_last)
    else:
        laid = torch.randn(5, 3, 6, 12, dtype=dtype)[..., ::2]
        laid.copy_(x)
    assert not laid.is_contiguous()

    def total(inputs):
        callbacks = [DataGradientPenalty(0.5), AdversarialTraining(0.1, adversarial_weight=0.5),
                     VirtualAdversarialTraining(1.0, logits_fn=lambda m, b: net(b[0]))]
        return penalized_loss(net, lambda b: F.cross_entropy(net(b[0]), b[1]), (inputs, y), callbacks)

    # A layout changes only the kernels' summation order: O(ε) per value. VAT's direction is a difference quotient
    # with relative step ξ = ε^(1/3), which turns that into O(ε/ξ) = O(ε^(2/3)); allow 10× (2.4e-4 in float32).
    # (With the former fixed ξ = 1e-6 the amplification was 1/ξ: 9.4e-4 apart on some CPUs.)
    rtol = 10 * torch.finfo(dtype).eps ** (2 / 3)
    torch.testing.assert_close(total(laid), total(x), rtol=rtol, atol=rtol)
