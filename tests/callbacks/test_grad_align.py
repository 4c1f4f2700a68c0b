"""GradAlign beside FGSM training against the authors' step (tests/robust_loops.py), float64, SGD with momentum; its
finite-difference route; its place outside adversarial training; the functional twin; the refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import AdversarialTraining, GradAlign
from lightning_gp import functional as LF
from lightning_gp.functional._rng import seeded_generator
from lightning_gp.functional.grad_align import grad_align_cosines
from lightning_gp.step._chain import ORDER
from tests.robust_loops import grad_align_fgsm_step_loss

STEPS, BATCH, SEED, EPS = 4, 16, 5, 0.2
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 4))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.8)
        self.double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9)


def data(n: int = STEPS * BATCH) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).argmax(1))


def generator(step: int) -> torch.Generator:
    """GradAlign's documented draw: (the run's seed, rank, global step, micro-batch, its place in the chain)."""
    return seeded_generator("cpu", SEED, 0, step, 0, ORDER["GradAlign"])


def fit(callbacks) -> Net:
    model = Net()
    pl.seed_everything(SEED, verbose=False)
    pl.Trainer(max_steps=STEPS, precision="64-true", callbacks=callbacks, **QUIET).fit(
        model, DataLoader(data(), batch_size=BATCH))
    return model


def by_hand(lam: float) -> Net:
    model = Net()
    opt = model.configure_optimizers()
    x_all, y_all = data().tensors
    for t in range(STEPS):
        x, y = x_all[t * BATCH:(t + 1) * BATCH], y_all[t * BATCH:(t + 1) * BATCH]
        opt.zero_grad()
        grad_align_fgsm_step_loss(model.net, x, y, EPS, lam, generator(t)).backward()
        opt.step()
    return model


def fgsm():
    return AdversarialTraining(EPS, norm="linf", clamp=(0.0, 1.0))  # zero init, step ε: the authors' attack_init=zero


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("order", ["gradalign_first", "fgsm_first"])
def test_fgsm_with_grad_align_equals_the_authors_step(order):
    """Whatever the list's order, GradAlign's gradients are of the clean batch (it sits outside FGSM in the chain)."""
    callbacks = [GradAlign(0.5, EPS, method="double_backward"), fgsm()]
    got = fit(callbacks if order == "gradalign_first" else callbacks[::-1])
    want = by_hand(0.5)
    assert max_diff(got, want) < 1e-9
    assert max_diff(want, by_hand(0.0)) > 1e-3  # the penalty changed the training


def test_finite_difference_converges_to_the_double_backward():
    """A forward difference: its error is first order in the step (10× smaller per decade)."""
    exact = fit([GradAlign(0.5, EPS, method="double_backward"), fgsm()])
    errors = [max_diff(fit([GradAlign(0.5, EPS, method="finite_difference", step=s), fgsm()]), exact)
              for s in (1e-3, 1e-4)]
    assert errors[1] < 1e-5 and 5 < errors[0] / errors[1] < 20
    assert max_diff(exact, fit([fgsm()])) > 1e-2  # against the size of what the penalty changes


def test_auto_takes_the_double_backward_where_there_is_one():
    cb = GradAlign(0.5, EPS)
    got = fit([cb, fgsm()])
    assert cb.resolved_method == "double_backward" and max_diff(got, by_hand(0.5)) < 1e-9


def test_functional_penalty_equals_the_authors_term():
    model, (x, y) = Net().net, data(BATCH).tensors
    ours = LF.grad_align_penalty(lambda u: F.cross_entropy(model(u), y), x, EPS, generator=generator(0))
    noise = torch.zeros_like(x).uniform_(-EPS, EPS, generator=generator(0))
    g1 = torch.autograd.grad(F.cross_entropy(model(x.requires_grad_()), y), x)[0]
    xn = (x.detach() + noise).requires_grad_()
    g2 = torch.autograd.grad(F.cross_entropy(model(xn), y), xn)[0]
    want = 1 - F.cosine_similarity(g1, g2, dim=1).mean()
    torch.testing.assert_close(ours, want, atol=1e-12, rtol=0)
    assert ours.requires_grad  # the second gradient keeps its graph: the penalty trains the parameters


def test_identical_gradients_give_zero_and_opposite_ones_two():
    g = torch.randn(5, 3, dtype=torch.float64)
    cos, used = grad_align_cosines(g, g)
    assert torch.allclose(cos, torch.ones(5, dtype=torch.float64)) and bool(used.all())
    cos, _ = grad_align_cosines(g, -g)
    assert torch.allclose(1 - cos.mean(), torch.tensor(2.0, dtype=torch.float64))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"weight": -1.0, "eps": 0.1}, "`weight`"), ({"weight": 0.2, "eps": 0.0}, "`eps`"),
    ({"weight": 0.2, "eps": 0.1, "norm": "l2"}, "`norm`"), ({"weight": 0.2, "eps": 0.1, "method": "x"}, "`method`"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        GradAlign(**kwargs)


def test_the_fgsm_gradient_at_x_is_reused_as_the_first_gradient():
    """FGSM from x has taken ∇ₓL at the clean input already, as the authors' step reuses it: one forward fewer."""
    calls = []
    model = Net()
    model.net.register_forward_hook(lambda *_: calls.append(1))
    pl.seed_everything(SEED, verbose=False)
    pl.Trainer(max_steps=1, precision="64-true", callbacks=[GradAlign(0.5, EPS), fgsm()], **QUIET).fit(
        model, DataLoader(data(), batch_size=BATCH))
    # the FGSM pass at x, the trial of method="auto", the pass at x + η, the training pass at x + δ
    assert len(calls) == 4
    calls.clear()
    pl.Trainer(max_steps=1, precision="64-true", callbacks=[GradAlign(0.5, EPS)], **QUIET).fit(
        model, DataLoader(data(), batch_size=BATCH))
    assert len(calls) == 4  # alone: the trial, its own pass at x, the pass at x + η, the training pass


def test_gradient_accumulation_equals_the_authors_step_per_micro_batch():
    """accumulate_grad_batches=2: each half-batch is the authors' step on it (its own η), the losses halved."""
    model = Net()
    pl.seed_everything(SEED, verbose=False)
    pl.Trainer(max_steps=STEPS // 2, precision="64-true", accumulate_grad_batches=2,
               callbacks=[GradAlign(0.5, EPS), fgsm()], **QUIET).fit(model, DataLoader(data(), batch_size=BATCH // 2))
    want = Net()
    opt = want.configure_optimizers()
    x_all, y_all = data().tensors
    half = BATCH // 2
    for t in range(STEPS // 2):
        opt.zero_grad()
        for m in range(2):
            i = (2 * t + m) * half
            gen = seeded_generator("cpu", SEED, 0, t, m, ORDER["GradAlign"])
            (grad_align_fgsm_step_loss(want.net, x_all[i:i + half], y_all[i:i + half], EPS, 0.5, gen) / 2).backward()
        opt.step()
    assert max_diff(model, want) < 1e-9
