"""SharpnessAwareMinimization against hand-written two-pass loops and pytorch-optimizer's SAM, in float64."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import Flooding, SharpnessAwareMinimization
from lightning_gp.functional import sam_perturbation

LR, MOMENTUM, STEPS, BATCH = 0.1, 0.9, 5, 8
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def data(n: int = STEPS * BATCH) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                               generator=gen))


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        layers = [torch.nn.Linear(6, 16)]
        if batch_norm:
            layers.append(torch.nn.BatchNorm1d(16))
        layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 3)]
        self.net = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


def fit(callbacks, model=None, **kwargs) -> Net:
    model = model or Net()
    trainer = pl.Trainer(max_steps=kwargs.pop("max_steps", STEPS), precision=kwargs.pop("precision", "64-true"),
                         callbacks=callbacks, log_every_n_steps=1, **QUIET, **kwargs)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    return model


def hand_sam_gradient(loss_fn, params: list[torch.Tensor], rho: float, adaptive: bool = False) -> list[torch.Tensor]:
    """∇L(θ + ε) by the SAM paper's two passes: g at θ, ε from g (ASAM: scaled by θ²), the gradient at θ + ε, θ back."""
    g = torch.autograd.grad(loss_fn(), params)
    if adaptive:
        norm = torch.sqrt(sum(((p.abs() * gi) ** 2).sum() for p, gi in zip(params, g, strict=True)))
        eps = [rho * p.detach() ** 2 * gi / norm for p, gi in zip(params, g, strict=True)]
    else:
        norm = torch.sqrt(sum((gi.float() ** 2).sum() for gi in g))
        eps = [(rho * gi / norm).to(gi.dtype) for gi in g]
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p += e
    g_sam = torch.autograd.grad(loss_fn(), params)
    with torch.no_grad():
        for p, e in zip(params, eps, strict=True):
            p -= e
    return list(g_sam)


def sgd_step(opt: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    for p, gi in zip(params, grads, strict=True):
        p.grad = gi
    opt.step()


def hand_written(rho: float, adaptive: bool, steps: int = STEPS, every: int = 1) -> Net:
    """The two-pass loop of the SAM paper: g at θ, ε from g, the gradient at θ + ε, then the optimizer step
    (a plain step where the step number is not a multiple of ``every``)."""
    model = Net().double()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for t, (x, y) in enumerate(list(DataLoader(data(), batch_size=BATCH))[:steps]):
        loss_fn = lambda x=x, y=y: F.cross_entropy(model.net(x), y)  # noqa: E731
        if t % every:  # a plain step
            sgd_step(opt, params, list(torch.autograd.grad(loss_fn(), params)))
        else:
            sgd_step(opt, params, hand_sam_gradient(loss_fn, params, rho, adaptive))
    return model


def assert_same(a: torch.nn.Module, b: torch.nn.Module, tol: float = 1e-9) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0, msg=name)


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
def test_equals_the_hand_written_two_pass_loop(adaptive, rho):
    assert_same(fit([SharpnessAwareMinimization(rho, adaptive=adaptive)]), hand_written(rho, adaptive))


@pytest.mark.parametrize("adaptive,rho", [(False, 0.05), (True, 0.5)])
def test_equals_pytorch_optimizer_sam(adaptive, rho):
    """pytorch-optimizer's SAM (first_step/second_step) is an independent oracle. Its ‖g‖ has a 1e-12 guard and is
    taken in float32 (a relative 6e-8 on ε; measured 1e-9 on the parameters after five ASAM steps at ρ = 0.5), hence
    1e-8 here; against the float64 hand-written loop the callback is equal to 2e-16."""
    from pytorch_optimizer import SAM

    model = Net().double()
    opt = SAM(model.parameters(), base_optimizer=torch.optim.SGD, rho=rho, adaptive=adaptive, lr=LR,
              momentum=MOMENTUM)
    for x, y in DataLoader(data(), batch_size=BATCH):
        F.cross_entropy(model.net(x), y).backward()
        opt.first_step(zero_grad=True)
        F.cross_entropy(model.net(x), y).backward()
        opt.second_step(zero_grad=True)
    assert_same(fit([SharpnessAwareMinimization(rho, adaptive=adaptive)]), model, tol=1e-8)


def test_control_sam_moves_the_trajectory():
    """The comparisons above can fail: plain SGD ends elsewhere."""
    diff = max((a - b).abs().max() for a, b in zip(fit([]).state_dict().values(),
                                                    hand_written(0.05, False).state_dict().values(), strict=True))
    assert diff > 1e-4


def test_gradient_accumulation_takes_each_micro_batch_s_own_epsilon():
    """Two micro-batches of 4 per step: each takes ε from its own gradient, and the step averages them."""
    model = Net().double()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    batches = list(DataLoader(data(), batch_size=BATCH // 2))
    for t in range(2):
        total = [torch.zeros_like(p) for p in params]
        for x, y in batches[2 * t: 2 * t + 2]:
            g_sam = hand_sam_gradient(lambda x=x, y=y: F.cross_entropy(model.net(x), y), params, 0.05)
            for acc, gi in zip(total, g_sam, strict=True):
                acc += gi / 2
        sgd_step(opt, params, total)
    got = Net()
    trainer = pl.Trainer(max_steps=2, precision="64-true", accumulate_grad_batches=2,
                         callbacks=[SharpnessAwareMinimization(0.05)], **QUIET)
    trainer.fit(got, DataLoader(data(), batch_size=BATCH // 2))
    assert_same(got, model)


def test_batch_norm_statistics_are_those_of_one_plain_step():
    plain, sam = Net(batch_norm=True), Net(batch_norm=True)
    fit([], plain, max_steps=1)
    fit([SharpnessAwareMinimization(0.05)], sam, max_steps=1)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sam.net[1], name), getattr(plain.net[1], name), atol=0, rtol=0)


def test_dropout_masks_of_the_clean_pass_are_replayed():
    """With dropout, the perturbed pass sees the clean pass's mask: the gap at ρ → 0 goes to 0."""
    pl.seed_everything(0, verbose=False)
    module = Net(dropout=0.5)
    trainer = pl.Trainer(max_steps=1, precision="64-true", callbacks=[SharpnessAwareMinimization(1e-8)],
                         log_every_n_steps=1, **QUIET)
    trainer.fit(module, DataLoader(data(), batch_size=BATCH))
    assert abs(float(trainer.callback_metrics["sharpness/sam_gap"])) < 1e-6


def test_logs_the_sam_gap_and_it_is_positive_near_a_nonflat_point():
    trainer = pl.Trainer(max_steps=2, precision="64-true", callbacks=[SharpnessAwareMinimization(0.05)],
                         log_every_n_steps=1, **QUIET)
    trainer.fit(Net(), DataLoader(data(), batch_size=BATCH))
    assert float(trainer.callback_metrics["sharpness/sam_gap"]) > 0


def test_bf16_mixed_matches_the_hand_written_loop_under_autocast():
    """Under bf16-mixed the step is the two-pass loop run under autocast, with ε from the unscaled gradient. The loop
    takes ε and the displacement from the same functions as the callback (`sam_perturbation`, `displaced`; both
    checked in float64 above), so both sides run the same operations and must agree bit for bit on any CPU: a
    one-ulp difference in ε could flip a bf16 rounding of a weight and move the step by far more than an ulp."""
    from lightning_gp.functional._autograd import displaced

    model = Net().float()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for x64, y in list(DataLoader(data(), batch_size=BATCH))[:3]:
        def loss_fn(x=x64.float(), y=y):  # noqa: B008  (bound per batch, as the loop variable)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return F.cross_entropy(model.net(x), y)

        direction, h = sam_perturbation(params, torch.autograd.grad(loss_fn(), params), rho=0.05)
        with displaced(params, direction, h):
            g_sam = torch.autograd.grad(loss_fn(), params)
        sgd_step(opt, params, list(g_sam))

    class Float(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x.float()), y)

    got = Float().float()
    trainer = pl.Trainer(max_steps=3, precision="bf16-mixed", callbacks=[SharpnessAwareMinimization(0.05)], **QUIET)
    trainer.fit(got, DataLoader(data(), batch_size=BATCH))
    assert_same(got, model, tol=0)


def test_resume_is_bit_identical(tmp_path):
    """Checkpointed after one epoch (5 steps), resumed to two: equal bit for bit to the run straight through. The
    module is built in float64: a float32 one would be loaded (rounded) before "64-true" converts it."""

    def trainer(epochs: int, callback: SharpnessAwareMinimization) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs, precision="64-true", callbacks=[callback], default_root_dir=tmp_path,
                          logger=False, enable_progress_bar=False, enable_model_summary=False)

    straight = Net().double()
    trainer(2, SharpnessAwareMinimization(0.05, every_n_steps=2)).fit(straight, DataLoader(data(), batch_size=BATCH))
    first = trainer(1, SharpnessAwareMinimization(0.05, every_n_steps=2))
    first.fit(Net().double(), DataLoader(data(), batch_size=BATCH))
    first.save_checkpoint(tmp_path / "mid.ckpt")
    resumed, callback = Net().double(), SharpnessAwareMinimization(0.05, every_n_steps=2)
    trainer(2, callback).fit(resumed, DataLoader(data(), batch_size=BATCH), ckpt_path=tmp_path / "mid.ckpt")
    assert_same(resumed, straight, tol=0)
    assert callback.applied == 5  # steps 0, 2, 4 before the checkpoint, 6 and 8 after


def test_every_n_steps_alternates_sam_and_plain_steps():
    got = fit([SharpnessAwareMinimization(0.05, every_n_steps=2)], max_steps=4)
    assert_same(got, hand_written(0.05, False, steps=4, every=2))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=-0.1), "`rho` must be a non-negative number, got -0.1"),
    (dict(rho=float("nan")), "`rho` must be a non-negative number, got nan"),
    (dict(rho=float("inf")), "`rho` must be a non-negative number, got inf"),
    (dict(scope="world"), "`scope` must be one of"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharpnessAwareMinimization(**kwargs)


def test_flooding_in_the_same_trainer_is_refused():
    with pytest.raises(ValueError, match="Flooding"):
        fit([SharpnessAwareMinimization(0.05), Flooding(0.1)])


def test_a_nan_gradient_is_not_hidden():
    class NaNNet(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x * float("nan")), y)

    with pytest.raises(FloatingPointError):
        fit([SharpnessAwareMinimization(0.05)], NaNNet())


def test_sam_perturbation_degenerate_gradients():
    w = torch.ones(3)
    assert sam_perturbation([w], [torch.zeros(3)], rho=0.1)[1] == 0.0
    h = sam_perturbation([w], [torch.tensor([1.0, float("nan"), 0.0])], rho=0.1)[1]
    assert h != h  # NaN, never a finite step hiding it


def test_composes_with_adversarial_training_in_one_step():
    from lightning_gp import AdversarialTraining

    model = Net().double()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for x, y in list(DataLoader(data(), batch_size=BATCH))[:2]:
        xr = x.detach().requires_grad_(True)
        (gx,) = torch.autograd.grad(F.cross_entropy(model.net(xr), y), xr)
        x_adv = (x + 0.1 * gx / gx.norm(dim=1, keepdim=True)).detach()
        sgd_step(opt, params, hand_sam_gradient(lambda x_adv=x_adv, y=y: F.cross_entropy(model.net(x_adv), y),
                                                params, 0.05))
    got = fit([AdversarialTraining(0.1), SharpnessAwareMinimization(0.05)], max_steps=2)
    assert_same(got, model)


def test_deep_copy_and_repr():
    sam = SharpnessAwareMinimization(0.1, adaptive=True, scope="global")
    assert repr(sam) == "SharpnessAwareMinimization(rho=0.1, adaptive=True, scope='global')"
    assert repr(copy.deepcopy(sam)) == repr(sam)


def test_alone_and_beside_other_callbacks_it_gives_the_same_step():
    """Alone, SAM's objective is L(θ + ε) linearised; beside another member, the clean gradient plus the difference.
    Both are ∇L(θ + ε)."""
    from lightning_gp import ParameterGradientPenalty

    alone = fit([SharpnessAwareMinimization(0.05)])
    beside = fit([SharpnessAwareMinimization(0.05), ParameterGradientPenalty(0.0)])
    assert_same(alone, beside, tol=1e-12)


def test_gradient_clipping_applies_to_the_final_gradient():
    model = Net().double()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    for x, y in list(DataLoader(data(), batch_size=BATCH))[:3]:
        for p, gi in zip(params, hand_sam_gradient(lambda x=x, y=y: F.cross_entropy(model.net(x), y), params, 0.05),
                         strict=True):
            p.grad = gi
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt.step()
    got = fit([SharpnessAwareMinimization(0.05)], max_steps=3, gradient_clip_val=0.1)
    assert_same(got, model)


def test_a_compiled_model_trains_as_the_eager_one():
    """SAM needs no double backward: a torch.compile'd module (aot_eager) takes the same steps as the eager one."""
    eager = fit([SharpnessAwareMinimization(0.05)], max_steps=3)
    compiled = Net()
    compiled.net = torch.compile(compiled.net, backend="aot_eager")
    fit([SharpnessAwareMinimization(0.05)], compiled, max_steps=3)
    for a, b in zip(eager.net.parameters(), compiled.net.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


class ParameterWatcher(pl.Callback):
    """Copies of the parameters at each hook of a step (placed before SAM, so its hooks run first)."""

    def __init__(self, fail_at: str | None = None) -> None:
        self.seen: dict[str, list[list[torch.Tensor]]] = {}
        self.fail_at = fail_at

    def _record(self, hook: str, pl_module: pl.LightningModule) -> None:
        self.seen.setdefault(hook, []).append([p.detach().clone() for p in pl_module.parameters()])
        if hook == self.fail_at:
            raise RuntimeError(f"fault injected in {hook}")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._record("start", pl_module)

    def on_before_backward(self, trainer, pl_module, loss):
        self._record("before_backward", pl_module)

    def on_after_backward(self, trainer, pl_module):
        self._record("after_backward", pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._record("before_optimizer_step", pl_module)


class UnusedAndFrozen(Net):
    """A frozen first layer and a parameter the loss never reads: neither gets a gradient, both are displaced."""

    def __init__(self) -> None:
        super().__init__()
        self.net[0].requires_grad_(False)
        self.unused = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))


class WatchedNet(Net):
    """Records its parameters in its own `on_after_backward` (which Lightning calls after every callback's)."""

    def __init__(self) -> None:
        super().__init__()
        self.after_backward: list[list[torch.Tensor]] = []

    def on_after_backward(self) -> None:
        self.after_backward.append([p.detach().clone() for p in self.parameters()])


@pytest.mark.parametrize("model", [WatchedNet, UnusedAndFrozen])
@pytest.mark.parametrize("watcher_first", [True, False])
def test_theta_is_back_bit_for_bit_when_the_backward_ends(model, watcher_first):
    """Alone, SAM lets Lightning's backward differentiate the pass at θ + ε itself and puts θ back bit for bit in its
    own `on_after_backward` (Lightning calls the module's after every callback's). Where a callback listed before SAM
    has an `on_after_backward`, which would see θ + ε, SAM takes the perturbed gradient itself and θ is back before
    `training_step` returns. Either way the step equals the two-pass loop's."""
    watcher, sam = ParameterWatcher(), SharpnessAwareMinimization(0.05)
    module = model()
    fit([watcher, sam] if watcher_first else [sam, watcher], module, max_steps=2)
    held = not watcher_first
    assert sam._hold_for_backward is held  # the control: both routes are taken
    for step in range(2):
        start = watcher.seen["start"][step]
        for hook in ("after_backward", "before_optimizer_step"):
            for a, b in zip(watcher.seen[hook][step], start, strict=True):
                assert torch.equal(a, b), hook
        moved = [not torch.equal(a, b) for a, b in zip(watcher.seen["before_backward"][step], start, strict=True)]
        assert any(moved) is held  # between training_step and its backward, θ + ε on the held route only
        if model is WatchedNet:
            for a, b in zip(module.after_backward[step], start, strict=True):
                assert torch.equal(a, b)
    if model is WatchedNet:
        assert_same(module, hand_written(0.05, False, steps=2))


@pytest.mark.parametrize("hook", ["before_backward", "perturbed_pass"])
def test_a_fault_between_the_passes_and_the_backward_leaves_theta(hook):
    """A fault while θ is displaced (in the perturbed pass itself, or in a hook before the backward) stops `fit`
    with the parameters back at θ, bit for bit."""

    class FailsOnItsSecondPass(Net):
        calls = 0

        def training_step(self, batch, batch_idx):
            FailsOnItsSecondPass.calls += 1
            if FailsOnItsSecondPass.calls == 2:
                raise RuntimeError("fault injected in the perturbed pass")
            return super().training_step(batch, batch_idx)

    watcher = ParameterWatcher(fail_at=hook)
    module = FailsOnItsSecondPass() if hook == "perturbed_pass" else Net()
    with pytest.raises(RuntimeError, match="fault injected"):
        fit([watcher, SharpnessAwareMinimization(0.05)], module)
    for a, b in zip(module.parameters(), watcher.seen["start"][0], strict=True):
        assert torch.equal(a.detach(), b)


def test_activation_checkpointing_recomputes_at_theta_plus_epsilon():
    """A checkpointed block recomputes its forward inside Lightning's backward: it must still see θ + ε there, and
    the step equal the two-pass loop's. (A reentrant checkpoint, `use_reentrant=True`, refuses `autograd.grad`, which
    every two-pass method needs for its first gradient; torch's error says to pass `use_reentrant=False`.)"""
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            # the output layer recomputed in the backward (its input requires grad, as a reentrant checkpoint needs)
            return F.cross_entropy(checkpoint(self.net[3], self.net[:3](x), use_reentrant=False), y)

    assert_same(fit([SharpnessAwareMinimization(0.05)], Checkpointed(), max_steps=3),
                hand_written(0.05, False, steps=3))


def test_a_reentrant_checkpoint_is_refused_with_the_fix():
    """A reentrant checkpoint refuses `autograd.grad`, which SAM's first gradient needs: the error names the
    setting that works, for torch and for Hugging Face models."""
    from torch.utils.checkpoint import checkpoint

    class Reentrant(Net):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(checkpoint(self.net[3], self.net[:3](x), use_reentrant=True), y)

    with pytest.raises(RuntimeError, match=r"SharpnessAwareMinimization .* use_reentrant=False.*"
                                           r"gradient_checkpointing_kwargs=\{'use_reentrant': False\}"):
        fit([SharpnessAwareMinimization(0.05)], Reentrant(), max_steps=1)


def test_a_hugging_face_model_with_activation_checkpointing_takes_the_same_steps():
    """GPT-2 (tiny local config) with `gradient_checkpointing_enable()`: its blocks recompute their forward inside
    Lightning's backward, at θ + ε, and the three SAM steps equal those without checkpointing, bit for bit."""
    pytest.importorskip("transformers")
    from tests.hf_zoo import ZOO, HFModule, loader

    def run(checkpointed: bool) -> list[torch.Tensor]:
        module = HFModule(ZOO["gpt2_lm"], attn="eager")
        if checkpointed:
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer = pl.Trainer(max_steps=3, precision="64-true", callbacks=[SharpnessAwareMinimization(0.05)], **QUIET)
        trainer.fit(module, loader(ZOO["gpt2_lm"]))
        return [p.detach().clone() for p in module.parameters()]

    plain, checkpointed = run(False), run(True)
    assert any(not torch.equal(a, b) for a, b in zip(plain, [p for p in HFModule(ZOO["gpt2_lm"]).parameters()],
                                                     strict=True))  # the control: the steps moved the weights
    for a, b in zip(plain, checkpointed, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("watcher_first", [True, False])
def test_a_zero_gradient_takes_a_zero_step_on_both_routes(watcher_first):
    """g = 0 gives ε = 0: the step's gradient is ∇L(θ) = 0, the gap 0, no error, θ unmoved (held route or not)."""

    class Flat(Net):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) * 0.0

    watcher, sam = ParameterWatcher(), SharpnessAwareMinimization(0.05)
    module = Flat()
    start = [p.detach().clone() for p in module.parameters()]
    fit([watcher, sam] if watcher_first else [sam, watcher], module, max_steps=2)
    assert sam._hold_for_backward is not watcher_first and sam.applied == 2
    for a, b in zip(module.parameters(), start, strict=True):
        assert torch.equal(a.detach(), b)
    assert all(torch.equal(a, b) for a, b in zip(watcher.seen["before_backward"][0], start, strict=True))


class Shapes(pl.LightningModule):
    """Models whose parameters sit on their storage in different ways (float64, a regression on 6 features)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.kind = kind
        if kind == "conv, channels last":
            self.conv = torch.nn.Conv2d(2, 4, 3).double().to(memory_format=torch.channels_last)
        elif kind == "lstm":
            self.lstm = torch.nn.LSTM(3, 4, batch_first=True).double()
        else:
            self.lin = torch.nn.Linear(6, 6).double()
        if kind == "tied":  # one Parameter object in two modules
            self.out = torch.nn.Linear(6, 6, bias=False).double()
            self.out.weight = self.lin.weight
        elif kind == "storage alias":  # a second Parameter on the first one's storage
            self.twin = torch.nn.Parameter(self.lin.weight.data)
        elif kind == "buffer alias":  # a buffer on a parameter's storage
            self.register_buffer("mirror", self.lin.weight.data)
        elif kind == "sparse buffer":  # a graph's adjacency, as graph networks keep it
            self.register_buffer("adjacency", torch.eye(6, dtype=torch.float64).to_sparse())
        elif kind == "views of one buffer":  # parameters cut from one flat tensor (a flat-parameter layout)
            flat = torch.randn(42, dtype=torch.float64)
            self.lin.weight = torch.nn.Parameter(flat[:36].view(6, 6))
            self.lin.bias = torch.nn.Parameter(flat[36:])

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.kind == "conv, channels last":
            out = self.conv(x.reshape(-1, 2, 3, 1).expand(-1, 2, 3, 3).contiguous(memory_format=torch.channels_last))
            return ((out.mean(dim=(1, 2, 3)) - y.double()) ** 2).mean()
        if self.kind == "lstm":
            out, _ = self.lstm(x.reshape(-1, 2, 3))
            return ((out[:, -1].sum(-1) - y.double()) ** 2).mean()
        h = torch.tanh(self.lin(x))
        if self.kind == "tied":
            h = torch.tanh(self.out(h))
        elif self.kind == "storage alias":
            h = h @ self.twin
        elif self.kind == "buffer alias":
            h = h @ self.mirror
        elif self.kind == "sparse buffer":
            h = torch.sparse.mm(self.adjacency, h.T).T
        return ((h.sum(-1) - y.double()) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)


@pytest.mark.parametrize("kind,swaps", [("plain", True), ("tied", True), ("lstm", True), ("conv, channels last", True),
                                        ("sparse buffer", True),
                                        ("storage alias", False), ("buffer alias", False),
                                        ("views of one buffer", False)])
def test_the_storage_swap_takes_the_steps_of_the_in_place_displacement(kind, swaps, monkeypatch):
    """Alone, SAM moves parameters that fill their storage alone to θ + ε by a storage swap; parameters that share it
    (with another parameter, a buffer, or as views into one buffer) move in place. Either way the steps are bit for
    bit those of the in-place displacement, and equal those of the route that takes the gradient inside the step."""
    import lightning_gp.functional._autograd as autograd_blocks

    seen: list[bool] = []
    original = autograd_blocks.Displacement.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        seen.append(self.swapped)

    monkeypatch.setattr(autograd_blocks.Displacement, "__init__", spy)
    swapped = fit([SharpnessAwareMinimization(0.05)], Shapes(kind), max_steps=3)
    assert seen == [swaps] * 3
    with monkeypatch.context() as m:
        m.setattr(autograd_blocks, "sole_owners", lambda *a: False)
        in_place = fit([SharpnessAwareMinimization(0.05)], Shapes(kind), max_steps=3)
    assert seen[3:] == [False] * 3
    inside = fit([ParameterWatcher(), SharpnessAwareMinimization(0.05)], Shapes(kind), max_steps=3)
    for (name, a), b, c in zip(swapped.named_parameters(), in_place.parameters(), inside.parameters(), strict=True):
        assert torch.equal(a, b), name
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0, msg=name)
    for (name, p), q in zip(swapped.named_parameters(), Shapes(kind).parameters(), strict=True):
        assert p.stride() == q.stride() and not torch.equal(p, q), name  # same layout, and it trained
    if kind == "buffer alias":
        assert swapped.mirror.data_ptr() == swapped.lin.weight.data_ptr()
