"""interpolate, wgan_gradient_penalty, r1/r2 and difference_penalty against hand computations."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_gp.functional.gan import (
    difference_penalty,
    interpolate,
    r1_penalty,
    r2_penalty,
    wgan_gradient_penalty,
)

F64 = torch.float64


def _critic(d_in=4, hidden=16, act=nn.Tanh):
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, 1)).to(F64)


def test_interpolate_one_alpha_per_sample_on_images():
    torch.manual_seed(30)
    real = torch.rand(6, 3, 5, 5) + 2.0  # real − fake never 0, so the ratio below is defined
    fake = torch.rand(6, 3, 5, 5) - 2.0
    x_hat = interpolate(real, fake)
    ratio = ((x_hat - fake) / (real - fake)).flatten(1)  # = α, elementwise
    alpha = ratio[:, 0]
    torch.testing.assert_close(ratio, alpha[:, None].expand_as(ratio))  # constant within a sample
    assert alpha.unique().numel() == 6  # different across samples
    assert ((alpha >= 0) & (alpha <= 1)).all()


def test_interpolate_given_alpha_and_dtype():
    real, fake = torch.randn(4, 2, 3, dtype=F64), torch.randn(4, 2, 3, dtype=F64)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0])  # float32 alpha, float64 data: the data's dtype wins
    x_hat = interpolate(real, fake, alpha)
    assert x_hat.dtype == F64
    torch.testing.assert_close(x_hat, alpha.to(F64)[:, None, None] * real + (1 - alpha.to(F64))[:, None, None] * fake)
    torch.testing.assert_close(x_hat[0], fake[0])
    torch.testing.assert_close(x_hat[3], real[3])
    # Any shape with B elements is accepted, e.g. the (B, 1, 1) shape many WGAN-GP codes use.
    torch.testing.assert_close(interpolate(real, fake, alpha.reshape(4, 1, 1)), x_hat)


def test_interpolate_is_uniform_on_average():
    real, fake = torch.ones(20000, 1), torch.zeros(20000, 1)
    alpha = interpolate(real, fake)[:, 0]
    assert abs(float(alpha.mean()) - 0.5) < 0.01
    assert abs(float(alpha.var()) - 1 / 12) < 0.005


@pytest.mark.parametrize(("center", "one_sided"), [(1.0, False), (1.0, True), (0.0, False)])
def test_wgan_penalty_matches_torch_func_reference(center, one_sided):
    torch.manual_seed(31)
    critic = _critic()
    with torch.no_grad():
        critic[2].weight.mul_(6)  # gradient norms on both sides of 1
    real, fake = torch.randn(10, 4, dtype=F64), torch.randn(10, 4, dtype=F64) * 0.1
    alpha = torch.rand(10, dtype=F64)
    gp = wgan_gradient_penalty(critic, real, fake, alpha=alpha, center=center, one_sided=one_sided)
    grads = torch.autograd.grad(gp, list(critic.parameters()), materialize_grads=True)

    x_hat = alpha[:, None] * real + (1 - alpha[:, None]) * fake

    def reference(params):
        g = vmap(grad(lambda xi: functional_call(critic, params, (xi.unsqueeze(0),)).squeeze()))(x_hat)
        gap = torch.linalg.vector_norm(g, dim=1) - center
        return (gap.clamp_min(0) if one_sided else gap).square().mean()

    params = {k: v.detach() for k, v in critic.named_parameters()}
    torch.testing.assert_close(gp, reference(params))
    ref_grads = grad(reference)(params)
    for (name, _), g in zip(critic.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, ref_grads[name], msg=name)


def test_wgan_penalty_linear_critic_closed_form_and_no_gradient_to_generator():
    critic = nn.Linear(3, 1).to(F64)
    real = torch.randn(5, 3, dtype=F64)
    fake = torch.randn(5, 3, dtype=F64, requires_grad=True)  # as if from a generator
    gp = wgan_gradient_penalty(critic, real, fake)
    torch.testing.assert_close(gp, (critic.weight.norm() - 1) ** 2)
    gp.backward()
    assert fake.grad is None
    w = critic.weight.detach()
    torch.testing.assert_close(critic.weight.grad, 2 * (w.norm() - 1) * w / w.norm())


def test_wgan_penalty_per_sample_independent_of_batch():
    torch.manual_seed(32)
    critic = _critic()
    real, fake = torch.randn(6, 4, dtype=F64), torch.randn(6, 4, dtype=F64)
    alpha = torch.rand(6, dtype=F64)
    full = wgan_gradient_penalty(critic, real, fake, alpha=alpha) * 6
    singles = [wgan_gradient_penalty(critic, real[i : i + 1], fake[i : i + 1], alpha=alpha[i : i + 1])
               for i in range(6)]
    torch.testing.assert_close(full, torch.stack(singles).sum())
    # Replace samples 1.. by others: sample 0's term is unchanged.
    real2, fake2 = real.clone(), fake.clone()
    real2[1:], fake2[1:] = torch.randn(5, 4, dtype=F64) * 4, torch.randn(5, 4, dtype=F64)
    changed = wgan_gradient_penalty(critic, real2, fake2, alpha=alpha) * 6
    rest = wgan_gradient_penalty(critic, real2[1:], fake2[1:], alpha=alpha[1:]) * 5
    torch.testing.assert_close(changed - rest, singles[0])


def test_wgan_penalty_on_images_norm_over_every_non_batch_dim():
    torch.manual_seed(33)
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 1)).to(F64)
    real, fake = torch.randn(4, 3, 5, 5, dtype=F64), torch.randn(4, 3, 5, 5, dtype=F64)
    alpha = torch.rand(4, dtype=F64)
    gp = wgan_gradient_penalty(critic, real, fake, alpha=alpha)
    x_hat = (alpha[:, None, None, None] * real + (1 - alpha[:, None, None, None]) * fake).requires_grad_()
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
    torch.testing.assert_close(gp, ((torch.linalg.vector_norm(g, dim=(1, 2, 3)) - 1) ** 2).mean())


def test_wgan_penalty_dead_relu_sample_gives_finite_gradients():
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].bias.zero_()
    real, fake = torch.rand(4, 3), torch.rand(4, 3)
    real[1], fake[1] = -3.0, -1.0  # every interpolate of this pair is in the dead region
    gp = wgan_gradient_penalty(net, real, fake)
    grads = torch.autograd.grad(gp, list(net.parameters()), materialize_grads=True)
    assert torch.isfinite(gp)
    assert all(torch.isfinite(g).all() for g in grads)
    gp1 = wgan_gradient_penalty(net, real, fake, one_sided=True)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(gp1, list(net.parameters()),
                                                                   materialize_grads=True))


def test_r1_r2_linear_critic_closed_form():
    critic = nn.Linear(5, 1).to(F64)
    real, fake = torch.randn(7, 5, dtype=F64), torch.randn(7, 5, dtype=F64, requires_grad=True)
    w = critic.weight.detach()
    torch.testing.assert_close(r1_penalty(critic, real), w.square().sum())
    r2 = r2_penalty(critic, fake)
    torch.testing.assert_close(r2, w.square().sum())
    r2.backward()
    torch.testing.assert_close(critic.weight.grad, 2 * w)
    assert fake.grad is None


def test_r1_quadratic_critic_closed_form():
    # D(x) = ½‖Ax‖²: ∇D = AᵀA x, R1 = mean ‖AᵀA xᵢ‖².
    a = torch.randn(3, 4, dtype=F64)
    real = torch.randn(6, 4, dtype=F64)
    m = a.T @ a
    r1 = r1_penalty(lambda x: 0.5 * (x @ a.T).square().sum(1), real)
    torch.testing.assert_close(r1, (real @ m).square().sum(1).mean())


def test_difference_penalty_hand_computation():
    torch.manual_seed(34)
    critic = _critic(d_in=3)
    real, fake = torch.randn(5, 3, dtype=F64), torch.randn(5, 3, dtype=F64)
    a1, a2 = torch.rand(5, dtype=F64), torch.rand(5, dtype=F64)
    got = difference_penalty(critic, real, fake, alpha=(a1, a2))
    with torch.no_grad():
        slopes = []
        for i in range(5):
            x1 = a1[i] * real[i] + (1 - a1[i]) * fake[i]
            x2 = a2[i] * real[i] + (1 - a2[i]) * fake[i]
            d1, d2 = critic(x1[None])[0, 0], critic(x2[None])[0, 0]
            slopes.append(abs(float(d1 - d2)) / float((x1 - x2).norm()))
    assert float(got.detach()) == pytest.approx(sum((s - 1.0) ** 2 for s in slopes) / 5, rel=1e-10)
    got0 = difference_penalty(critic, real, fake, alpha=(a1, a2), center=0.0)
    assert float(got0.detach()) == pytest.approx(sum(s**2 for s in slopes) / 5, rel=1e-10)


def test_difference_penalty_linear_critic_and_degenerate_pairs():
    critic = nn.Linear(2, 1, bias=False).to(F64)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
    real = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=F64)
    fake = torch.zeros(3, 2, dtype=F64)
    a1 = torch.tensor([0.9, 0.1, 0.5], dtype=F64)
    a2 = torch.tensor([0.2, 0.6, 0.5], dtype=F64)  # pair 2 coincides: left out of the mean
    got = difference_penalty(critic, real, fake, alpha=(a1, a2))
    # Slope along real−fake: |w·d|/‖d‖ = 3 and 4 for the first two pairs.
    torch.testing.assert_close(got, torch.tensor(((3 - 1) ** 2 + (4 - 1) ** 2) / 2, dtype=F64))
    got.backward()
    assert torch.isfinite(critic.weight.grad).all()
    # All pairs degenerate: zero, with a graph, no NaN.
    critic.zero_grad()
    zero = difference_penalty(critic, real, fake, alpha=(a1, a1))
    assert float(zero.detach()) == 0
    zero.backward()
    assert torch.isfinite(critic.weight.grad).all()
