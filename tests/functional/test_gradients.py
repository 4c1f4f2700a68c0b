"""input_gradient, per_sample_norm and per_sample_squared_norm against closed forms and torch.func."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_gp.functional.gradients import input_gradient, per_sample_norm, per_sample_squared_norm


def _mlp(d_in, hidden=16, act=nn.Tanh, dtype=torch.float64):
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, 1)).to(dtype)


def test_input_gradient_linear_model_is_the_weight():
    model = nn.Linear(5, 1).double()
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = input_gradient(model(x)[:, 0], x)
    torch.testing.assert_close(g, model.weight.detach().expand(7, 5))


def test_input_gradient_quadratic_model_closed_form():
    # f(x) = xᵀ A x  ⇒  ∇ₓf = (A + Aᵀ) x, per sample.
    a = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    out = torch.einsum("bi,ij,bj->b", x, a, x)
    g = input_gradient(out, x)
    torch.testing.assert_close(g, x.detach() @ (a + a.T).T)


def test_input_gradient_matches_vmap_grad_on_images():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 8), nn.GELU(), nn.Linear(8, 1)).double()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = input_gradient(net(x), x)

    params = dict(net.named_parameters())

    def f_single(xi):
        return functional_call(net, params, (xi.unsqueeze(0),)).squeeze()

    ref = vmap(grad(f_single))(x.detach())
    torch.testing.assert_close(g, ref)


def test_input_gradient_is_per_sample_not_batch_averaged():
    # Row i depends only on sample i, and not on the batch size: the gradient of the *sum*.
    net = _mlp(3)
    x = torch.randn(6, 3, dtype=torch.float64)
    x_a = x.clone().requires_grad_()
    g_full = input_gradient(net(x_a), x_a)
    x_b = x.clone()
    x_b[1:] = torch.randn(5, 3, dtype=torch.float64) * 10
    x_b.requires_grad_()
    g_changed = input_gradient(net(x_b), x_b)
    x_c = x[:1].clone().requires_grad_()
    g_single = input_gradient(net(x_c), x_c)
    torch.testing.assert_close(g_full[0], g_changed[0])
    torch.testing.assert_close(g_full[0], g_single[0])


def test_input_gradient_create_graph_gives_hessian_vector_product():
    net = _mlp(4)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, dtype=torch.float64)
    g = input_gradient(net(x), x, create_graph=True)
    (hv,) = torch.autograd.grad((g * v).sum(), x)
    params = dict(net.named_parameters())

    def f_single(xi):
        return functional_call(net, params, (xi.unsqueeze(0),)).squeeze()

    ref = vmap(lambda xi, vi: torch.func.jvp(grad(f_single), (xi,), (vi,))[1])(x.detach(), v)
    torch.testing.assert_close(hv, ref)


@pytest.mark.parametrize("shape", [(4, 7), (3, 2, 5), (2, 3, 4, 5)])
def test_per_sample_norm_over_every_non_batch_dim(shape):
    t = torch.randn(*shape, dtype=torch.float64)
    dims = tuple(range(1, len(shape)))
    torch.testing.assert_close(per_sample_norm(t), torch.linalg.vector_norm(t, dim=dims))
    torch.testing.assert_close(per_sample_squared_norm(t), torch.linalg.vector_norm(t, dim=dims) ** 2)
    assert per_sample_norm(t).shape == (shape[0],)


def test_per_sample_norm_1d_input_is_absolute_value():
    t = torch.tensor([-3.0, 0.0, 2.0])
    torch.testing.assert_close(per_sample_norm(t), t.abs())


def test_per_sample_norm_gradient_is_unit_vector_and_zero_at_zero():
    t = torch.randn(3, 2, 4, dtype=torch.float64)
    t[1] = 0
    t.requires_grad_()
    (g,) = torch.autograd.grad(per_sample_norm(t).sum(), t)
    expected = t.detach() / torch.linalg.vector_norm(t.detach(), dim=(1, 2)).clamp_min(1e-300)[:, None, None]
    torch.testing.assert_close(g, expected)
    assert torch.equal(g[1], torch.zeros_like(g[1]))


def test_per_sample_norm_double_backward_through_dead_relu_sample_is_finite():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].bias.zero_()
    x = torch.rand(4, 3)
    x[0] = -5.0  # every pre-activation negative: ∇ₓf = 0 for this sample
    x.requires_grad_()
    g = input_gradient(net(x), x, create_graph=True)
    assert torch.equal(g[0], torch.zeros(3))
    norms = per_sample_norm(g)
    assert norms[0] == 0
    grads = torch.autograd.grad(norms.sum(), list(net.parameters()), materialize_grads=True)
    assert all(torch.isfinite(g).all() for g in grads)
    # The live samples' norms still have a nonzero parameter gradient: the zero sample did not mask it.
    assert grads[0].abs().sum() > 0


def test_squared_norm_sum_equals_the_norm_of_the_concatenation_and_keeps_the_graph():
    from lightning_gp.functional.gradients import squared_norm_sum

    tensors = [torch.randn(5, 3, dtype=torch.float64), torch.randn(7, dtype=torch.float64), torch.randn(2, 2, 2)]
    flat = torch.cat([t.reshape(-1).double() for t in tensors])
    assert torch.allclose(squared_norm_sum(tensors).double(), torch.linalg.vector_norm(flat) ** 2)
    w = torch.randn(4, requires_grad=True)
    (grad,) = torch.autograd.grad(squared_norm_sum([w, 2 * w]), w)  # differentiable: d(5‖w‖²)/dw = 10w
    assert torch.allclose(grad, 10 * w.detach())


def test_tensor_norms_and_total_norm_match_linalg_and_get_total_norm():
    from lightning_gp.functional.gradients import tensor_norms, total_norm

    tensors = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2), torch.zeros(4)]
    expected = torch.stack([torch.linalg.vector_norm(t) for t in tensors])
    torch.testing.assert_close(tensor_norms(tensors), expected)
    torch.testing.assert_close(total_norm(tensors), torch.nn.utils.get_total_norm(tensors))
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.testing.assert_close(total_norm(tuple(tensors)), torch.linalg.vector_norm(flat))
    mixed = [torch.randn(3, dtype=torch.float64), torch.randn(4)]  # dtypes promote, as in get_total_norm
    assert tensor_norms(mixed).dtype == torch.float64
    torch.testing.assert_close(total_norm(mixed), torch.nn.utils.get_total_norm(mixed).double())
    assert tensor_norms([]).shape == (0,) and float(total_norm([])) == 0.0
