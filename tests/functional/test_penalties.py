"""data_gradient_penalty, gradient_norm_penalty and parameter_gradient_penalty against closed forms and
independent torch.func computations (float64, tight tolerances)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from lightning_gp.functional.gradients import input_gradient
from lightning_gp.functional.penalties import (
    data_gradient_penalty,
    gradient_norm_penalty,
    parameter_gradient_penalty,
)

F64 = torch.float64
SHAPES = [(2, 0.0, False), (1, 0.0, False), (2, 1.0, False), (1, 1.0, False), (2, 1.0, True), (1.5, 0.5, False)]


def _tanh_mlp(d_in=4, hidden=12):
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, 1)).to(F64)


def _phi(norm, power, center, one_sided):
    gap = norm - center
    if one_sided:
        gap = gap.clamp_min(0)
    return gap.abs() ** power


def _mixed_around_center(net, x):
    """Scale so that some samples' ‖∇ₓf‖ fall below 1 and some above (one-sided cases)."""
    x[::2] *= 0.02
    with torch.no_grad():
        net[0].weight.mul_(3)
        net[-1].weight.mul_(8)


def _reference_penalty(net, x, power, center, one_sided):
    """The penalty as a function of the parameters, entirely through torch.func (no autograd.grad)."""

    def penalty(params):
        def f_single(xi):
            return functional_call(net, params, (xi.unsqueeze(0),)).squeeze()

        g = vmap(grad(f_single))(x)
        norms = torch.linalg.vector_norm(g.flatten(1), dim=1)
        return _phi(norms, power, center, one_sided).mean()

    params = {k: v.detach() for k, v in net.named_parameters()}
    return penalty(params), grad(penalty)(params)


@pytest.mark.parametrize(("power", "center", "one_sided"), SHAPES)
def test_data_gradient_penalty_value_and_parameter_gradient_match_torch_func(power, center, one_sided):
    torch.manual_seed(3)
    net = _tanh_mlp()
    x = torch.randn(9, 4, dtype=F64)
    if one_sided:
        _mixed_around_center(net, x)
    xr = x.clone().requires_grad_()
    pen = data_gradient_penalty(net(xr), xr, power=power, center=center, one_sided=one_sided)
    grads = torch.autograd.grad(pen, list(net.parameters()), materialize_grads=True)

    ref_value, ref_grads = _reference_penalty(net, x, power, center, one_sided)
    torch.testing.assert_close(pen, ref_value)
    for (name, _), g in zip(net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(g, ref_grads[name], msg=name)


def test_one_sided_case_is_really_mixed():
    # Guard for the test above: the one-sided data has norms both below and above the center.
    torch.manual_seed(3)
    net = _tanh_mlp()
    x = torch.randn(9, 4, dtype=F64)
    _mixed_around_center(net, x)
    x.requires_grad_()
    norms = input_gradient(net(x), x).norm(dim=1)
    assert (norms < 1).any() and (norms > 1).any()


@pytest.mark.parametrize(("power", "center"), [(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0), (3, 0.5)])
def test_data_gradient_penalty_linear_model_closed_form(power, center):
    # f(x) = w·x + b: ∇ₓf = w for every sample; penalty (‖w‖ − c)ᵖ; ∂/∂w = p(‖w‖ − c)ᵖ⁻¹ w/‖w‖.
    model = nn.Linear(5, 1).to(F64)
    x = torch.randn(6, 5, dtype=F64, requires_grad=True)
    pen = data_gradient_penalty(model(x), x, power=power, center=center)
    w = model.weight.detach()[0]
    n = w.norm()
    torch.testing.assert_close(pen, (n - center).abs() ** power)
    pen.backward()
    expected = power * (n - center).abs() ** (power - 1) * torch.sign(n - center) * w / n
    torch.testing.assert_close(model.weight.grad[0], expected)


def test_data_gradient_penalty_quadratic_model_closed_form():
    # f(x) = xᵀWx: ∇ₓf = S x with S = W + Wᵀ; mean‖S xᵢ‖² has gradient G + Gᵀ, G = (2/B) S Σ xᵢxᵢᵀ.
    w = torch.randn(4, 4, dtype=F64, requires_grad=True)
    x = torch.randn(7, 4, dtype=F64, requires_grad=True)
    pen = data_gradient_penalty(torch.einsum("bi,ij,bj->b", x, w, x), x)
    s = (w + w.T).detach()
    xd = x.detach()
    torch.testing.assert_close(pen, ((xd @ s.T) ** 2).sum(1).mean())
    (gw,) = torch.autograd.grad(pen, w)
    big_g = 2 / 7 * s @ xd.T @ xd
    torch.testing.assert_close(gw, big_g + big_g.T)


def test_one_sided_closed_form_on_scaled_norm_model():
    # f(x) = ½ a ‖x‖²: ‖∇ₓf‖ = |a|‖x‖. One-sided: mean max(0, a‖x‖ − 1)², d/da = mean 2 max(0, ·)‖x‖.
    a = torch.tensor(0.7, dtype=F64, requires_grad=True)
    x = torch.randn(10, 3, dtype=F64)
    x[:5] *= 0.1  # these stay below the center
    norms = x.norm(dim=1)
    xr = x.clone().requires_grad_()
    pen = data_gradient_penalty(0.5 * a * xr.square().sum(1), xr, center=1.0, one_sided=True)
    gap = (0.7 * norms - 1).clamp_min(0)
    assert (gap == 0).sum() >= 5 and (gap > 0).any()
    torch.testing.assert_close(pen, (gap**2).mean())
    (ga,) = torch.autograd.grad(pen, a)
    torch.testing.assert_close(ga, (2 * gap * norms).mean())
    # The two-sided version differs exactly by the samples below the center.
    xr2 = x.clone().requires_grad_()
    two = data_gradient_penalty(0.5 * a * xr2.square().sum(1), xr2, center=1.0)
    torch.testing.assert_close(two, ((0.7 * norms - 1) ** 2).mean())


@pytest.mark.parametrize(("power", "center", "one_sided"), SHAPES)
def test_gradient_norm_penalty_matches_linalg(power, center, one_sided):
    t = torch.randn(5, 2, 3, dtype=F64)
    t[1] = 0
    ref = _phi(torch.linalg.vector_norm(t, dim=(1, 2)), power, center, one_sided)
    torch.testing.assert_close(gradient_norm_penalty(t, power=power, center=center, one_sided=one_sided), ref)


@pytest.mark.parametrize(("power", "center"), [(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0)])
def test_data_penalty_per_sample_independence_and_batch_size(power, center):
    """B·penalty is a sum of per-sample terms: each term depends only on its own sample."""
    torch.manual_seed(4)
    net = _tanh_mlp(d_in=3)

    def total(x):  # the sum-scaled penalty
        x = x.clone().requires_grad_()
        return data_gradient_penalty(net(x), x, power=power, center=center) * x.shape[0]

    x = torch.randn(6, 3, dtype=F64)
    singles = torch.stack([total(x[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(total(x), singles.sum())
    # Changing other samples leaves sample 0's term alone: B·P(x) − (B−1)·P(x without 0) is that term.
    x_changed = x.clone()
    x_changed[1:] = torch.randn(5, 3, dtype=F64) * 3
    torch.testing.assert_close(total(x_changed) - total(x_changed[1:]), singles[0])
    # The same sample repeated B times gives the same mean whatever B (no 1/B or 1/B² scaling).
    for b in (1, 2, 5, 8):
        torch.testing.assert_close(total(x[:1].expand(b, 3)) / b, singles[0])


def test_data_penalty_per_sample_on_images_uses_every_non_batch_dim():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 1)).to(F64)
    x = torch.randn(4, 2, 5, 5, dtype=F64, requires_grad=True)
    pen = data_gradient_penalty(net(x), x, power=1)
    g = input_gradient(net(x), x)
    torch.testing.assert_close(pen, torch.linalg.vector_norm(g, dim=(1, 2, 3)).mean())


@pytest.mark.parametrize(("power", "center"), [(1, 0.0), (2, 0.0), (1, 1.0), (2, 1.0), (2, 0.5)])
def test_dead_relu_sample_gives_finite_parameter_gradients(power, center):
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].bias.zero_()
    x = torch.rand(5, 3)
    x[2] = -4.0  # all pre-activations negative: ∇ₓf = 0 exactly
    x.requires_grad_()
    assert torch.equal(input_gradient(net(x), x)[2], torch.zeros(3))
    pen = data_gradient_penalty(net(x), x, power=power, center=center)
    grads = torch.autograd.grad(pen, list(net.parameters()), materialize_grads=True)
    assert torch.isfinite(pen)
    for g in grads:
        assert torch.isfinite(g).all()
    # The dead sample adds nothing to the gradient: same as the penalty on the live samples, rescaled.
    xl = torch.cat([x[:2], x[3:]]).detach().requires_grad_()
    live = data_gradient_penalty(net(xl), xl, power=power, center=center) * 4 / 5
    live_grads = torch.autograd.grad(live, list(net.parameters()), materialize_grads=True)
    for g, lg in zip(grads, live_grads, strict=True):
        torch.testing.assert_close(g, lg)


def test_parameter_gradient_penalty_value_is_sum_of_squared_grads():
    torch.manual_seed(7)
    net = _tanh_mlp(d_in=3)
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, dtype=F64)
    loss = (net(x)[:, 0] - y).square().mean()
    pen = parameter_gradient_penalty(loss, net)
    explicit = sum(g.square().sum() for g in torch.autograd.grad(loss, list(net.parameters()), retain_graph=True))
    torch.testing.assert_close(pen, explicit)
    # Also from an explicit list of tensors, and a single tensor.
    torch.testing.assert_close(parameter_gradient_penalty(loss, list(net.parameters())), explicit)
    w = net[0].weight
    (gw,) = torch.autograd.grad(loss, w, retain_graph=True)
    torch.testing.assert_close(parameter_gradient_penalty(loss, w), gw.square().sum())


def test_parameter_gradient_penalty_gradient_is_two_hessian_gradient():
    torch.manual_seed(8)
    net = _tanh_mlp(d_in=3)
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, dtype=F64)
    loss = (net(x)[:, 0] - y).square().mean()
    pen = parameter_gradient_penalty(loss, net)
    grads = torch.autograd.grad(pen, list(net.parameters()))

    def loss_of(params):
        return (functional_call(net, params, (x,))[:, 0] - y).square().mean()

    params = {k: v.detach() for k, v in net.named_parameters()}
    g = grad(loss_of)(params)
    _, hg = jvp(grad(loss_of), (params,), (g,))
    for (name, _), got in zip(net.named_parameters(), grads, strict=True):
        torch.testing.assert_close(got, 2 * hg[name], msg=name)


def test_parameter_gradient_penalty_quadratic_closed_form():
    # L = ½ θᵀAθ with A symmetric: ∇L = Aθ, ‖∇L‖² = θᵀA²θ, its gradient 2A²θ = 2·H·g.
    a = torch.randn(5, 5, dtype=F64)
    a = a + a.T
    theta = torch.randn(5, dtype=F64, requires_grad=True)
    pen = parameter_gradient_penalty(0.5 * theta @ a @ theta, [theta])
    torch.testing.assert_close(pen, (a @ theta).square().sum())
    (g,) = torch.autograd.grad(pen, theta)
    torch.testing.assert_close(g, 2 * a @ a @ theta.detach())


def test_parameter_gradient_penalty_unused_parameter_counts_as_zero():
    used = torch.randn(3, dtype=F64, requires_grad=True)
    unused = torch.randn(2, dtype=F64, requires_grad=True)
    pen = parameter_gradient_penalty((used**2).sum(), [used, unused])
    torch.testing.assert_close(pen, (2 * used).square().sum())


def test_complex_parameters_penalised_as_their_real_and_imaginary_parts():
    """A complex parameter z = a + ib: torch's gradient is ∂L/∂a + i·∂L/∂b, so ‖∇_z L‖² = ‖∇_a L‖² + ‖∇_b L‖², and
    the double-backward penalty and its gradient equal those of the same model written over (a, b) in float64.
    (The differentiable sum squared z itself: a complex value, which torch's backward refused.)"""
    from lightning_gp.functional import parameter_gradient_penalty

    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(2))
    x = torch.randn(7, 5, dtype=torch.complex128, generator=gen)

    def loss_of(z):
        return ((x * z).sum(-1).abs() ** 2).log1p().mean()

    z = torch.complex(a, b).requires_grad_(True)
    penalty = parameter_gradient_penalty(loss_of(z), [z])
    (got,) = torch.autograd.grad(penalty, z)

    ra, rb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    ga, gb = torch.autograd.grad(loss_of(torch.complex(ra, rb)), [ra, rb], create_graph=True)
    want_penalty = ga.square().sum() + gb.square().sum()
    want_a, want_b = torch.autograd.grad(want_penalty, [ra, rb])
    assert penalty.dtype == torch.float64
    torch.testing.assert_close(penalty, want_penalty, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, torch.complex(want_a, want_b), rtol=1e-10, atol=1e-12)
