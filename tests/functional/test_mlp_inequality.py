import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from lightning_gp.functional.mlp_inequality import mlp_inequality

ACTIVATIONS = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}


def mlp(widths, act, bias):
    layers = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers)


def independent(model, x, loss):
    """lhs, rhs and the per-layer terms from torch.func.jacrev, matrix_norm(ord=2) and torch.func.grad."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def f(p, xi):
        return loss(functional_call(model, p, (xi.unsqueeze(0),)))[0]

    dp, dx = vmap(grad(f, argnums=(0, 1)), in_dims=(None, 0))(params, x)
    rhs = sum(v.reshape(len(x), -1).square().sum(1) for v in dp.values())
    gx2 = dx.reshape(len(x), -1).square().sum(1)
    terms = []
    for i, mod in enumerate(model):
        if not isinstance(mod, nn.Linear):
            continue
        prefix = model[:i]

        def h_of(xi, prefix=prefix):
            return prefix(xi.unsqueeze(0))[0].reshape(-1)

        jac = vmap(jacrev(h_of))(x).reshape(len(x), -1, x[0].numel())
        sigma = torch.linalg.matrix_norm(jac, ord=2)
        h2 = prefix(x).reshape(len(x), -1).square().sum(1)
        coef = float(mod.bias is not None and mod.bias.requires_grad) + float(mod.weight.requires_grad) * h2
        terms.append(gx2 * coef / (torch.linalg.matrix_norm(mod.weight.detach(), ord=2) ** 2 * sigma**2))
    return torch.stack(terms, 1), rhs


def out_norm(out):
    return out.square().sum(1)


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 256), min_size=2, max_size=7),
    act=st.sampled_from(sorted(ACTIVATIONS)),
    bias=st.booleans(),
    iterative=st.booleans(),
    max_iter=st.sampled_from([1, 3, 200]),
    seed=st.integers(0, 2**16),
)
def test_ratio_never_exceeds_one(widths, act, bias, iterative, max_iter, seed):
    """Depth 1–6, widths 1–256, float32; the iterative norm even after a single power iteration."""
    torch.manual_seed(seed)
    model = mlp(widths, act, bias)
    x = torch.randn(4, widths[0])
    r = mlp_inequality(model, x, out_norm, exact_max_dim=0 if iterative else 256, max_iter=max_iter)
    assert r.is_chain and r.jacobian_exact == (not iterative)
    assert (r.ratio <= 1 + 1e-5).all(), (r.ratio, r.lhs_terms, r.rhs_terms)
    assert (r.lhs_terms <= r.rhs_terms * (1 + 1e-5) + 1e-30).all()
    assert (r.ratio >= 0).all() and (r.ratio_lower <= r.ratio * (1 + 1e-6)).all()


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_equals_independent_computation(act):
    torch.manual_seed(1)
    model = mlp([6, 9, 7, 5, 3], act, bias=True).double()
    model[2] = nn.Linear(9, 7, bias=False).double()  # a bias-free layer: its term drops the "1 +"
    model[4].bias.requires_grad_(False)  # a frozen bias is not in θ: dropped on both sides
    x = torch.randn(5, 6, dtype=torch.float64)
    r = mlp_inequality(model, x, out_norm)
    terms, rhs = independent(model, x, out_norm)
    torch.testing.assert_close(r.lhs_terms, terms, rtol=1e-9, atol=0)
    torch.testing.assert_close(r.lhs, terms.sum(1), rtol=1e-9, atol=0)
    torch.testing.assert_close(r.rhs, rhs, rtol=1e-9, atol=0)
    torch.testing.assert_close(r.ratio, terms.sum(1) / rhs, rtol=1e-9, atol=0)
    assert r.layer_names == ("0", "2", "4", "6") and (r.ratio <= 1).all()
    torch.testing.assert_close(r.ratio_lower, r.ratio)


def test_power_iteration_brackets_the_exact_norm():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(300, 64), nn.Tanh(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 3))
    model = model.double()
    x = torch.randn(6, 3, 10, 10, dtype=torch.float64)
    exact = mlp_inequality(model, x, out_norm, exact_max_dim=300)
    it = mlp_inequality(model, x, out_norm, tol=1e-10, max_iter=2000)  # 300 features > 256: iterative
    assert exact.jacobian_exact and not it.jacobian_exact and it.iterations > 1
    assert (it.jacobian_norm <= exact.jacobian_norm * (1 + 1e-12)).all()  # a lower bound
    assert (it.jacobian_norm_upper >= exact.jacobian_norm).all()  # a certified upper bound
    torch.testing.assert_close(it.jacobian_norm, exact.jacobian_norm, rtol=1e-6, atol=0)
    assert (it.ratio_lower <= exact.ratio * (1 + 1e-12)).all() and (it.ratio >= exact.ratio * (1 - 1e-6)).all()
    one = mlp_inequality(model, x, out_norm, max_iter=1)  # unconverged: the lhs is high, never above rhs
    assert (one.ratio >= exact.ratio * (1 - 1e-9)).all() and (one.ratio <= 1 + 1e-12).all()


def test_unconverged_iteration_cannot_fake_a_violation():
    """A tight chain (ratio exactly 1): W₂ is the top left singular vector of W₁. A power iteration from a
    random start understates ‖∇ₓh⁽²⁾‖₂ = ‖W₁‖₂ after one step and would report a ratio above 1; ours starts
    at ∇ₓf and may stop after a single step without ever crossing 1."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(300, 300), nn.Identity(), nn.Linear(300, 1)).double()
    with torch.no_grad():
        u = torch.linalg.svd(model[0].weight)[0][:, 0]
        model[2].weight.copy_(3 * u[None])
    x = torch.randn(6, 300, dtype=torch.float64)
    exact = mlp_inequality(model, x, lambda out: out[:, 0], exact_max_dim=300)
    torch.testing.assert_close(exact.ratio, torch.ones(6, dtype=torch.float64))
    one = mlp_inequality(model, x, lambda out: out[:, 0], max_iter=1)
    assert not one.jacobian_exact and one.iterations == 1
    assert (one.ratio <= 1 + 1e-9).all()


def test_tight_case_width_one_reaches_one():
    """With one unit per layer every Cauchy–Schwarz step is an equality: the ratio is exactly 1."""
    model = nn.Sequential(nn.Linear(1, 1), nn.Tanh(), nn.Linear(1, 1)).double()
    r = mlp_inequality(model, torch.randn(8, 1, dtype=torch.float64), lambda out: out[:, 0])
    torch.testing.assert_close(r.ratio, torch.ones(8, dtype=torch.float64))


class Residual(nn.Module):
    """x + W₂ tanh(W₁x) with small weights: ∇ₓf comes almost all through the skip, ∇θf is tiny."""

    def __init__(self, d=6):
        super().__init__()
        self.inner, self.outer = nn.Linear(d, d, bias=False), nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.inner.weight.mul_(1e-2)
            self.outer.weight.mul_(1e-2)

    def forward(self, x):
        return x + self.outer(torch.tanh(self.inner(x)))


def test_residual_block_breaks_the_bound_and_is_refused():
    torch.manual_seed(3)
    x = torch.randn(5, 6)
    with pytest.raises(ValueError, match=r"needs a sequential chain \(an nn.Sequential\), got Residual"):
        mlp_inequality(Residual(), x, out_norm)
    with pytest.raises(ValueError, match=r"Module '1' \(Residual\) is not a Linear"):
        mlp_inequality(nn.Sequential(nn.Linear(6, 6), Residual()), x, out_norm)
    for exact_max_dim in (256, 0):  # exact Jacobians and the torch.func power iteration
        r = mlp_inequality(Residual(), x, out_norm, allow_non_chain=True, exact_max_dim=exact_max_dim)
        assert not r.is_chain and r.layer_names == ("inner", "outer")
        assert (r.ratio > 1).all()  # the skip path bypasses both layers: the bound fails, and we say so
    chain = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 2))
    flagged = mlp_inequality(chain, x, out_norm, allow_non_chain=True)
    torch.testing.assert_close(flagged.ratio, mlp_inequality(chain, x, out_norm).ratio)
    generic = mlp_inequality(Residual(), x, out_norm, allow_non_chain=True, exact_max_dim=0)
    assert not generic.jacobian_exact and torch.isinf(generic.jacobian_norm_upper).all()  # no certificate
    assert (generic.ratio_lower == 0).all()


def test_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"'1' \(Dropout\) is in training mode"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 1)), x, out_norm)
    with pytest.raises(ValueError, match=r"'0' \(Softmax\) is not a Linear"):
        mlp_inequality(nn.Sequential(nn.Softmax(dim=1), nn.Linear(3, 1)), x, out_norm)
    with pytest.raises(ValueError, match="start_dim=2"):
        mlp_inequality(nn.Sequential(nn.Flatten(2), nn.Linear(3, 1)), x[:, None], out_norm)
    with pytest.raises(ValueError, match=r"needs \(batch, features\) inputs"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 1)), torch.randn(4, 2, 3), lambda out: out.sum((1, 2)))
    with pytest.raises(ValueError, match=r"no nn\.Linear layer"):
        mlp_inequality(nn.Sequential(nn.Tanh()), x, out_norm)
    with pytest.raises(ValueError, match="`max_samples` must be a positive int or None, got 0"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 1)), x, out_norm, max_samples=0)
    with pytest.raises(ValueError, match="`tol` must be a positive number"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 1)), x, out_norm, tol=0)
    with pytest.raises(ValueError, match="`max_iter` must be an int ≥ 1, got 0"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 1)), x, out_norm, max_iter=0)
    with pytest.raises(TypeError, match="`inputs` must be floating point"):
        mlp_inequality(nn.Sequential(nn.Linear(3, 1)), x.long(), out_norm)


def test_eval_dropout_flatten_identity_and_max_samples():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.Identity(), nn.ReLU(), nn.Linear(8, 2))
    model.eval()
    x, y = torch.randn(10, 3, 4), torch.randint(0, 2, (10,))
    r = mlp_inequality(model, x, lambda out: F.cross_entropy(out, y, reduction="none"), max_samples=4)
    assert r.ratio.shape == (4,) and r.lhs_terms.shape == (4, 2) and (r.ratio <= 1 + 1e-5).all()
    full = mlp_inequality(model, x[:4], lambda out: F.cross_entropy(out, y[:4], reduction="none"))
    torch.testing.assert_close(r.lhs_terms, full.lhs_terms)
    torch.testing.assert_close(r.rhs_terms, full.rhs_terms)


def test_dead_network_gives_zero_terms_and_leaves_the_global_rng_alone():
    model = nn.Sequential(nn.Linear(300, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU dead: ∇ₓf = 0, the power iteration needs another start
    x = torch.randn(4, 300)
    state = torch.get_rng_state()
    r = mlp_inequality(model, x, out_norm)
    assert torch.equal(torch.get_rng_state(), state)
    assert not r.jacobian_exact and (r.ratio == 0).all() and (r.rhs > 0).all() and r.lhs.isfinite().all()


def test_leaves_nothing_behind_also_when_loss_fn_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    x = torch.randn(5, 3)

    def boom(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        mlp_inequality(model, x, boom)
    mlp_inequality(model, x, lambda out: F.softplus(out).sum(1), exact_max_dim=0)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True, True, True, False]
    assert not x.requires_grad
