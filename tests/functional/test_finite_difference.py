"""Finite-difference penalty gradients against double backprop, and where double backprop cannot run:
inside a ``torch.compile``d model and through fused ``scaled_dot_product_attention``."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_gp.functional.gan import wgan_gradient_penalty, wgan_gradient_penalty_fd
from lightning_gp.functional.gradients import input_gradient
from lightning_gp.functional.penalties import (
    data_gradient_penalty,
    data_gradient_penalty_fd,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
)


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def _cosine(a, b):
    return float(F.cosine_similarity(_flat(a), _flat(b), dim=0))


def _smooth_mlp(dtype, act=nn.Tanh, d_in=6, hidden=32):
    return nn.Sequential(nn.Linear(d_in, hidden), act(), nn.Linear(hidden, hidden), act(),
                         nn.Linear(hidden, 1)).to(dtype)


def _double_backprop(model, x, **kw):
    x = x.detach().clone().requires_grad_()
    pen = data_gradient_penalty(model(x), x, **kw)
    return pen, torch.autograd.grad(pen, list(model.parameters()), materialize_grads=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", [nn.Tanh, nn.GELU])
@pytest.mark.parametrize(("power", "center", "one_sided"), [(2, 0.0, False), (1, 0.0, False), (2, 1.0, False),
                                                            (1, 1.0, False), (2, 1.0, True)])
def test_data_penalty_fd_matches_double_backprop(dtype, act, power, center, one_sided):
    torch.manual_seed(10)
    model = _smooth_mlp(dtype, act)
    x = torch.randn(32, 6, dtype=dtype)
    if one_sided:  # a center among the gradient norms, so that the one-sided cut really cuts
        xr = x.clone().requires_grad_()
        center = float(input_gradient(model(xr), xr).norm(dim=1).median())
    kw = dict(power=power, center=center, one_sided=one_sided)
    pen, ref = _double_backprop(model, x, **kw)
    assert _flat(ref).norm() > 0
    res = data_gradient_penalty_fd(model, x, model, **kw)
    torch.testing.assert_close(res.penalty, pen.detach())
    assert _cosine(res.grads, ref) >= 0.999
    # Magnitude too, not only direction.
    assert abs(_flat(res.grads).norm() / _flat(ref).norm() - 1) < 0.02
    # The gradient training needs, computed on the way: ∇θ mean f(x).
    x_plain = x.clone()
    out_grads = torch.autograd.grad(model(x_plain).mean(), list(model.parameters()))
    for a, b in zip(res.output_grads, out_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(res.output, model(x).detach()[:, 0])


def test_data_penalty_fd_error_shrinks_with_step():
    # First-order accurate in float64: the relative error falls roughly tenfold per tenfold step.
    torch.manual_seed(11)
    model = _smooth_mlp(torch.float64)
    x = torch.randn(16, 6, dtype=torch.float64)
    _, ref = _double_backprop(model, x)
    ref = _flat(ref)
    errs = [float((_flat(data_gradient_penalty_fd(model, x, model, step=s).grads) - ref).norm() / ref.norm())
            for s in (1e-2, 1e-3, 1e-4)]
    assert errs[1] < errs[0] / 5 and errs[2] < errs[1] / 5, errs
    assert errs[2] < 1e-4


def test_data_penalty_fd_does_not_modify_inputs_or_param_grads():
    model = _smooth_mlp(torch.float32)
    x = torch.randn(8, 6)
    x_copy = x.clone()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    data_gradient_penalty_fd(model, x, model)
    assert torch.equal(x, x_copy)
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_data_penalty_fd_dead_relu_batch_is_zero_not_nan():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    with torch.no_grad():
        net[0].weight.abs_()
        net[0].bias.zero_()
    x = torch.full((4, 3), -2.0)  # every sample dead: φ'(0) = 0 for power 2, center 0
    res = data_gradient_penalty_fd(net, x, net)
    assert res.penalty == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in res.grads)
    res1 = data_gradient_penalty_fd(net, x, net, power=2, center=1.0)  # ‖g‖ = 0 < 1: φ' = 0 as well
    assert all(torch.isfinite(g).all() for g in res1.grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parameter_penalty_fd_matches_double_backprop(dtype):
    torch.manual_seed(12)
    model = _smooth_mlp(dtype, nn.GELU)
    x, y = torch.randn(32, 6, dtype=dtype), torch.randn(32, dtype=dtype)

    def loss_fn():
        return (model(x)[:, 0] - y).square().mean()

    pen = parameter_gradient_penalty(loss_fn(), model)
    ref = torch.autograd.grad(pen, list(model.parameters()))
    res = parameter_gradient_penalty_fd(loss_fn, model)
    torch.testing.assert_close(res.penalty, pen.detach())
    assert _cosine(res.grads, ref) >= 0.999
    assert abs(_flat(res.grads).norm() / _flat(ref).norm() - 1) < 0.02
    torch.testing.assert_close(_flat(res.output_grads),
                               _flat(torch.autograd.grad(loss_fn(), list(model.parameters()))))


def test_parameter_penalty_fd_restores_parameters_bit_exactly():
    torch.manual_seed(13)
    model = _smooth_mlp(torch.float32)
    x = torch.randn(8, 6)
    before = [p.detach().clone() for p in model.parameters()]
    parameter_gradient_penalty_fd(lambda: model(x).square().mean(), model, step=0.1)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_parameter_penalty_fd_restores_parameters_when_loss_fn_raises():
    torch.manual_seed(14)
    model = _smooth_mlp(torch.float32)
    x = torch.randn(8, 6)
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == 2:
            # The parameters were moved before this second call: prove it, then fail.
            assert not torch.equal(model[0].weight, before[0])
            raise RuntimeError("boom on the second call")
        return model(x).square().mean()

    with pytest.raises(RuntimeError, match="boom on the second call"):
        parameter_gradient_penalty_fd(loss_fn, model, step=0.1)
    assert len(calls) == 2
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_wgan_penalty_fd_matches_double_backprop_with_same_alpha():
    torch.manual_seed(15)
    critic = _smooth_mlp(torch.float64, nn.Tanh, d_in=4)
    real, fake = torch.randn(16, 4, dtype=torch.float64), torch.randn(16, 4, dtype=torch.float64)
    alpha = torch.rand(16, dtype=torch.float64)
    gp = wgan_gradient_penalty(critic, real, fake, alpha=alpha)
    ref = torch.autograd.grad(gp, list(critic.parameters()), materialize_grads=True)
    res = wgan_gradient_penalty_fd(critic, real, fake, critic, alpha=alpha)
    torch.testing.assert_close(res.penalty, gp.detach())
    assert _cosine(res.grads, ref) >= 0.999
    # A different α gives a different penalty: the same-α agreement above is not a coincidence.
    other = wgan_gradient_penalty_fd(critic, real, fake, critic, alpha=1 - alpha)
    assert not torch.allclose(other.penalty, res.penalty)


# --- where double backward does not exist -------------------------------------------------------------


def test_compiled_model_double_backprop_raises_and_fd_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = _smooth_mlp(torch.float32, nn.Tanh, d_in=4, hidden=16)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(8, 4)

    xr = x.clone().requires_grad_()
    pen = data_gradient_penalty(compiled(xr), xr)  # first-order graph is fine ...
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        torch.autograd.grad(pen, list(model.parameters()), allow_unused=True)  # ... its backward is not

    y = torch.randn(8)
    loss = (compiled(x)[:, 0] - y).square().mean()
    pen_p = parameter_gradient_penalty(loss, model)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        torch.autograd.grad(pen_p, list(model.parameters()))

    res = data_gradient_penalty_fd(compiled, x, model)
    ref_pen, ref = _double_backprop(model, x)  # eager reference on the same weights
    torch.testing.assert_close(res.penalty, ref_pen.detach())
    assert _cosine(res.grads, ref) >= 0.999

    res_p = parameter_gradient_penalty_fd(lambda: (compiled(x)[:, 0] - y).square().mean(), model)
    eager = parameter_gradient_penalty((model(x)[:, 0] - y).square().mean(), model)
    torch.testing.assert_close(res_p.penalty, eager.detach())
    assert _cosine(res_p.grads, torch.autograd.grad(eager, list(model.parameters()))) >= 0.999
    torch._dynamo.reset()


class _Attention(nn.Module):
    """A tiny self-attention block scoring each sequence with one number."""

    def __init__(self, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 1)

    def forward(self, x):  # (B, T, dim) → (B,)
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        h = torch.tanh(x + self.proj(a))
        return self.head(h).mean(dim=(1, 2))


def test_sdpa_fused_kernel_double_backprop_raises_and_fd_matches_math_kernel():
    torch.manual_seed(17)
    block = _Attention()
    x = torch.randn(6, 5, 8)

    # The default CPU path for float inputs is the fused flash kernel; it has no double backward.
    # (The MATH backend, made of ordinary ops, does support it: it is the reference below.)
    for ctx in (contextlib.nullcontext(), sdpa_kernel(SDPBackend.FLASH_ATTENTION)):
        with ctx:
            xr = x.clone().requires_grad_()
            pen = data_gradient_penalty(block(xr), xr)
            with pytest.raises(RuntimeError, match="_scaled_dot_product_flash_attention_for_cpu_backward is not"):
                torch.autograd.grad(pen, list(block.parameters()))

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        res = data_gradient_penalty_fd(block, x, block)
    with sdpa_kernel(SDPBackend.MATH):
        ref_pen, ref = _double_backprop(block, x)
    torch.testing.assert_close(res.penalty, ref_pen.detach())
    assert _cosine(res.grads, ref) >= 0.999

    y = torch.randn(6)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        res_p = parameter_gradient_penalty_fd(lambda: (block(x) - y).square().mean(), block)
    with sdpa_kernel(SDPBackend.MATH):
        pen_p = parameter_gradient_penalty((block(x) - y).square().mean(), block)
        ref_p = torch.autograd.grad(pen_p, list(block.parameters()))
    assert _cosine(res_p.grads, ref_p) >= 0.999


@pytest.mark.parametrize("given", ["module", "tensors"])
@pytest.mark.parametrize("which", ["data", "parameter"])
def test_batchnorm_statistics_are_updated_once_whatever_params_are_given(given, which):
    """A plain-PyTorch user who passes `list(model.parameters())` got the running statistics updated twice (the
    second pass's update was kept: num_batches_tracked 2 after one call). They are now those of one forward, bit
    for bit, and the penalty's gradients equal those with the module given."""
    from lightning_gp.functional import data_gradient_penalty_fd, parameter_gradient_penalty_fd

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 1)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    plain = copy.deepcopy(model)
    plain(x)  # one training forward: the statistics a step should leave

    def run(params):
        if which == "data":
            return data_gradient_penalty_fd(lambda z: model(z)[:, 0], x, params)
        return parameter_gradient_penalty_fd(lambda: model(x).square().mean(), params)

    start = copy.deepcopy(model.state_dict())
    res = run(model if given == "module" else list(model.parameters()))
    for name, buf in plain.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], buf), name
    model.load_state_dict(start)
    ref = run(model)
    for a, b in zip(res.grads, ref.grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
