"""fgsm and pgd: torchattacks equivalence (l∞), the l2 step, projection, .grad hygiene, and the source
documents' first-order link between an l2 FGSM step and the penalty ε‖∇ₓℓ‖."""

import itertools

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_gp.functional.adversarial import fgsm, pgd
from lightning_gp.functional.penalties import data_gradient_penalty

F64 = torch.float64


def _classifier():
    # No dropout, no BatchNorm: torchattacks puts the model in eval mode, ours does not touch it.
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 32), nn.Tanh(), nn.Linear(32, 5))


def _images(b=16):
    return torch.rand(b, 3, 6, 6), torch.randint(0, 5, (b,))


def _ce(model, y, reduction="none"):
    return lambda inp: F.cross_entropy(model(inp), y, reduction=reduction)


@pytest.mark.parametrize("eps", [2 / 255, 8 / 255, 0.3])
def test_fgsm_linf_equals_torchattacks(eps):
    torch.manual_seed(20)
    model = _classifier()
    x, y = _images()
    ref = torchattacks.FGSM(model, eps=eps)(x, y)
    ours = fgsm(_ce(model, y), x, epsilon=eps, norm="linf", clamp=(0, 1))
    assert torch.equal(ours, ref)
    # Per-sample, summed or mean losses give the same sign step.
    assert torch.equal(fgsm(_ce(model, y, "mean"), x, epsilon=eps, norm="linf", clamp=(0, 1)), ref)
    assert not torch.equal(ours, x)


@pytest.mark.parametrize("seed", [0, 6, 15])
@pytest.mark.parametrize(("steps", "random_start"), [(1, False), (10, False), (10, True)])
def test_pgd_linf_equals_torchattacks(seed, steps, random_start):
    # Bit-exact, random start included (same RNG draw); the seeds are ones where an implementation
    # that carries δ instead of x_adv differs from torchattacks by an ulp.
    torch.manual_seed(seed)
    model = _classifier()
    x, y = _images(32)
    torch.manual_seed(100)
    ref = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=steps, random_start=random_start)(x, y)
    torch.manual_seed(100)
    ours = pgd(_ce(model, y), x, epsilon=8 / 255, norm="linf", steps=steps, step_size=2 / 255,
               random_start=random_start, clamp=(0, 1))
    assert torch.equal(ours, ref)


def test_fgsm_l2_step_has_norm_epsilon_per_sample_along_the_gradient():
    torch.manual_seed(22)
    model = _classifier().to(F64)
    x, y = _images(6)
    x = x.to(F64)
    eps = 0.5
    adv = fgsm(_ce(model, y), x, epsilon=eps)  # norm="l2" is the default
    delta = adv - x
    torch.testing.assert_close(torch.linalg.vector_norm(delta, dim=(1, 2, 3)), torch.full((6,), eps, dtype=F64))
    # Direction g/‖g‖ with g the per-sample gradient from torch.func.
    params = dict(model.named_parameters())

    def loss_single(xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    g = vmap(grad(loss_single))(x, y)
    expected = eps * g / torch.linalg.vector_norm(g, dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(delta, expected)


def test_fgsm_l2_zero_gradient_sample_is_left_in_place():
    w = torch.zeros(2, 3)
    w[:, 0] = 1.0  # the loss depends only on feature 0 ...
    x = torch.randn(4, 3)
    x[1, 0] = 0.0  # ... and for sample 1 its gradient there is 0 (loss = x₀²)
    adv = fgsm(lambda inp: (inp @ w.T)[:, 0] ** 2, x, epsilon=1.0)
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[1], x[1])
    torch.testing.assert_close((adv - x)[[0, 2, 3]].norm(dim=1), torch.ones(3))


def test_fgsm_epsilon_zero_returns_a_copy_of_inputs():
    model = _classifier()
    x, y = _images(4)
    adv = fgsm(_ce(model, y), x, epsilon=0.0)
    assert torch.equal(adv, x) and adv is not x and not adv.requires_grad


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_stays_in_epsilon_ball_and_clamp_range(norm, random_start):
    torch.manual_seed(23)
    model = _classifier()
    x, y = _images(8)
    eps = 0.5 if norm == "l2" else 0.05
    adv = pgd(_ce(model, y), x, epsilon=eps, norm=norm, steps=7, step_size=eps / 2,
              random_start=random_start, clamp=(0, 1))
    delta = (adv - x).flatten(1)
    size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert (adv >= 0).all() and (adv <= 1).all()
    assert not adv.requires_grad
    # It is an ascent method: the loss went up for the batch.
    with torch.no_grad():
        assert F.cross_entropy(model(adv), y) > F.cross_entropy(model(x), y)


def test_pgd_l2_projection_reaches_the_sphere():
    # Many steps of the same direction on a linear loss end exactly on the ε-sphere.
    w = torch.randn(1, 2, 3, 3)
    x = torch.randn(5, 2, 3, 3)
    adv = pgd(lambda inp: (inp * w).sum(dim=(1, 2, 3)), x, epsilon=0.7, steps=5, step_size=0.3, random_start=False)
    torch.testing.assert_close(torch.linalg.vector_norm(adv - x, dim=(1, 2, 3)), torch.full((5,), 0.7))
    torch.testing.assert_close(adv - x, 0.7 * (w / w.norm()).expand_as(x))


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "fgsm_rs"])
def test_attacks_leave_parameter_grad_unchanged(attack):
    model = _classifier()
    x, y = _images(4)
    known = [torch.full_like(p, 3.0) for p in model.parameters()]
    for p, k in zip(model.parameters(), known, strict=True):
        p.grad = k.clone()
    if attack == "fgsm":
        fgsm(_ce(model, y), x, epsilon=0.1)
    elif attack == "fgsm_rs":
        fgsm(_ce(model, y, "mean"), x, epsilon=0.1, norm="linf", random_start=True, clamp=(0, 1))
    else:
        pgd(_ce(model, y), x, epsilon=0.1, steps=3, step_size=0.05)
    for p, k in zip(model.parameters(), known, strict=True):
        assert torch.equal(p.grad, k)
    # And parameters without .grad keep none.
    model.zero_grad(set_to_none=True)
    fgsm(_ce(model, y), x, epsilon=0.1)
    assert all(p.grad is None for p in model.parameters())


def test_attacks_do_not_modify_inputs_and_work_under_no_grad():
    model = _classifier()
    x, y = _images(4)
    x_copy = x.clone()
    with torch.no_grad():
        adv = pgd(_ce(model, y), x, epsilon=0.1, steps=2, step_size=0.05)
    assert torch.equal(x, x_copy)
    assert not torch.equal(adv, x)


def test_fgsm_random_start_stays_in_ball():
    torch.manual_seed(24)
    model = _classifier()
    x, y = _images(8)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        adv = fgsm(_ce(model, y), x, epsilon=eps, norm=norm, random_start=True)
        delta = (adv - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        assert (size <= eps * (1 + 1e-5)).all()
        assert (size > 0).all()


def test_first_order_claim_fgsm_step_equals_norm_penalty_gradient():
    """∇θ Σℓ(x + ε gᵢ/‖gᵢ‖) − ∇θ Σℓ(x) = ε ∇θ Σ‖∇ₓℓᵢ‖ + O(ε²): the relative error shrinks like ε."""
    torch.manual_seed(25)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(F64)
    x = torch.randn(12, 5, dtype=F64)
    y = torch.randint(0, 3, (12,))
    params = list(model.parameters())

    def param_grad(inp):
        return torch.cat([g.flatten() for g in torch.autograd.grad(_ce(model, y)(inp).sum(), params)])

    xr = x.clone().requires_grad_()
    # Σᵢ‖gᵢ‖ = B · data_gradient_penalty(power=1).
    pen = data_gradient_penalty(_ce(model, y)(xr), xr, power=1) * x.shape[0]
    target = torch.cat([g.flatten() for g in torch.autograd.grad(pen, params)])
    base = param_grad(x)
    errors = []
    for eps in (1e-1, 1e-2, 1e-3, 1e-4):
        adv = fgsm(_ce(model, y), x, epsilon=eps, norm="l2")
        errors.append(float(((param_grad(adv) - base) / eps - target).norm() / target.norm()))
    for coarse, fine in itertools.pairwise(errors):
        assert 5 < coarse / fine < 20, errors  # first order: ×10 smaller ε, ≈ ×10 smaller error
    assert errors[-1] < 1e-4, errors
