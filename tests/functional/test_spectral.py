"""spectral_norm and spectral_norm_penalty against torch.linalg (matrix_norm(ord=2), svd)."""

import itertools

import pytest
import torch
from torch import nn

from lightning_gp.functional.spectral import COLD_START_ITERS, spectral_norm, spectral_norm_penalty

F64 = torch.float64


def _with_spectrum(rows, cols, singular_values):
    """A random matrix with the given singular values (so the power iteration's gap is known)."""
    u, _ = torch.linalg.qr(torch.randn(rows, rows, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=F64))
    s = torch.zeros(rows, cols, dtype=F64)
    k = len(singular_values)
    s[range(k), range(k)] = torch.tensor(singular_values, dtype=F64)
    return u @ s @ v.T


def test_spectral_norm_linear_weight_matches_matrix_norm():
    torch.manual_seed(40)
    layer = nn.Linear(24, 16).to(F64)
    sigma, u = spectral_norm(layer.weight, n_iter=500)
    torch.testing.assert_close(sigma, torch.linalg.matrix_norm(layer.weight.detach(), ord=2))
    assert u.shape == (16,)
    torch.testing.assert_close(u.norm(), torch.tensor(1.0, dtype=F64))


def test_spectral_norm_conv_kernel_is_reshaped_to_out_by_rest():
    torch.manual_seed(41)
    conv = nn.Conv2d(3, 8, kernel_size=3).to(F64)
    sigma, u = spectral_norm(conv.weight, n_iter=500)
    expected = torch.linalg.matrix_norm(conv.weight.detach().reshape(8, -1), ord=2)
    torch.testing.assert_close(sigma, expected)
    assert u.shape == (8,)


def test_cold_start_default_iterations_converge_with_a_spectral_gap():
    torch.manual_seed(42)
    w = _with_spectrum(10, 20, [5.0, 4.0, 2.0, 1.0])  # ratio 0.8: (0.8)^(2·30) ≈ 1.5e-6
    sigma, _ = spectral_norm(w)
    assert float(sigma) == pytest.approx(5.0, rel=1e-4)
    assert COLD_START_ITERS >= 1


def test_estimate_approaches_from_below():
    torch.manual_seed(43)
    w = _with_spectrum(12, 12, [3.0, 2.9, 2.5, 1.0, 0.5])  # small gap: slow, but never above σ
    true = 3.0
    for n in (1, 2, 5, 20, 100):
        sigma, _ = spectral_norm(w, n_iter=n)
        assert float(sigma) <= true * (1 + 1e-12)


def test_warm_start_converges_across_calls():
    torch.manual_seed(44)
    w = _with_spectrum(16, 32, [2.0, 1.8, 1.0, 0.3])
    sigma, u = spectral_norm(w, n_iter=1)
    errors = [2.0 - float(sigma)]
    for _ in range(120):  # one iteration per call, as in training with a warm start
        sigma, u = spectral_norm(w, u=u)
        errors.append(2.0 - float(sigma))
    assert all(e >= -1e-12 for e in errors)
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors))  # monotone
    assert errors[-1] < 1e-8 < errors[0]
    # Warm start = the same as that many iterations in one call.
    sigma_one, _ = spectral_norm(w, n_iter=121)
    torch.testing.assert_close(sigma, sigma_one)


def test_sigma_gradient_is_top_singular_vectors_outer_product():
    torch.manual_seed(45)
    w = _with_spectrum(6, 9, [4.0, 2.0, 1.0]).requires_grad_()
    sigma, _ = spectral_norm(w, n_iter=200)
    (g,) = torch.autograd.grad(sigma, w)
    u_svd, _, vh_svd = torch.linalg.svd(w.detach())
    torch.testing.assert_close(g, torch.outer(u_svd[:, 0], vh_svd[0]))  # sign-invariant product


def test_conv_sigma_gradient_flows_to_the_kernel_shape():
    torch.manual_seed(46)
    weight = torch.randn(4, 2, 3, 3, dtype=F64, requires_grad=True)
    sigma, _ = spectral_norm(weight, n_iter=500)
    (g,) = torch.autograd.grad(sigma, weight)
    u_svd, _, vh_svd = torch.linalg.svd(weight.detach().reshape(4, -1))
    torch.testing.assert_close(g, torch.outer(u_svd[:, 0], vh_svd[0]).reshape(4, 2, 3, 3))


def test_cold_start_does_not_consume_global_rng():
    w = torch.randn(5, 7)
    layer = nn.Linear(3, 2)
    state = torch.random.get_rng_state()
    spectral_norm(w)
    spectral_norm_penalty(layer)
    assert torch.equal(torch.random.get_rng_state(), state)
    # ... and is reproducible.
    assert torch.equal(spectral_norm(w, n_iter=1)[1], spectral_norm(w, n_iter=1)[1])


def _net():
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 8), nn.Tanh(),
                        nn.Linear(8, 1), nn.LayerNorm(1)).to(F64)
    with torch.no_grad():  # spectral gaps wide enough for the power iteration to converge tightly
        net[0].weight.copy_(_with_spectrum(4, 18, [1.5, 1.0, 0.5]).reshape(4, 2, 3, 3))
        net[3].weight.copy_(_with_spectrum(8, 36, [2.0, 1.2, 0.7, 0.1]))
    return net


def test_spectral_norm_penalty_is_sum_of_squared_sigmas():
    torch.manual_seed(47)
    net = _net()
    pen = spectral_norm_penalty(net, n_iter=500)
    mats = [net[0].weight.reshape(4, -1), net[3].weight, net[5].weight]  # not the LayerNorm
    expected = sum(torch.linalg.matrix_norm(m.detach(), ord=2) ** 2 for m in mats)
    torch.testing.assert_close(pen, expected)
    pen.backward()
    # d σ²/dW = 2σ u vᵀ.
    u, s, vh = torch.linalg.svd(net[3].weight.detach())
    torch.testing.assert_close(net[3].weight.grad, 2 * s[0] * torch.outer(u[:, 0], vh[0]))
    assert net[6].weight.grad is None


def test_spectral_norm_penalty_with_vectors_dict_warm_starts():
    torch.manual_seed(48)
    net = _net()
    vectors = {}
    first = spectral_norm_penalty(net, n_iter=1, vectors=vectors)
    assert sorted(vectors) == ["0", "3", "5"]
    assert vectors["0"].shape == (4,) and vectors["3"].shape == (8,) and vectors["5"].shape == (1,)
    stored = {k: v.clone() for k, v in vectors.items()}
    values = [float(first.detach())]
    for _ in range(200):
        values.append(float(spectral_norm_penalty(net, vectors=vectors).detach()))  # 1 iteration each
    assert not torch.equal(vectors["3"], stored["3"])  # updated in place
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(values))
    mats = [net[0].weight.reshape(4, -1), net[3].weight, net[5].weight]
    expected = float(sum(torch.linalg.matrix_norm(m.detach(), ord=2) ** 2 for m in mats))
    assert values[-1] == pytest.approx(expected, rel=1e-6)
    assert values[0] < expected
