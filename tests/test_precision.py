"""Difference steps follow the dtype a pass computes in: VAT's power iteration against the exact Hessian."""

import copy

import pytest
import torch
from torch.func import jacrev, vmap

from lightning_gp.functional.adversarial import ascent_direction
from lightning_gp.functional.precision import compute_dtype, difference_scale
from lightning_gp.functional.vat import kl_divergence, virtual_adversarial_direction, virtual_adversarial_xi


def _exact_power_iteration(net64, x64, start, iterations):
    """normalize(Hᵏ d₀) per sample, Hᵢ = Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ the KL's Hessian at r = 0, in float64."""
    jac = vmap(jacrev(lambda xi: net64(xi.unsqueeze(0)).squeeze(0)))(x64)  # (B, C, D)
    p = net64(x64).softmax(-1)
    fisher = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    hess = jac.transpose(1, 2) @ fisher @ jac  # (B, D, D)
    d = start
    for _ in range(iterations):
        d = torch.nn.functional.normalize((hess @ d.unsqueeze(-1)).squeeze(-1), dim=1)
    return d


@pytest.mark.parametrize("iterations", [1, 3])
@pytest.mark.parametrize(("dtype", "autocast", "min_cos"), [
    (torch.float64, False, 1 - 1e-8),
    (torch.float32, False, 0.995),
    # bfloat16 keeps 8 bits: a sample whose softmax is nearly saturated has a KL curvature below the logits'
    # rounding, and no ξ recovers its direction. Bounds on the bulk instead (ξ = 1e-6 gives a median of 0.2).
    (torch.bfloat16, False, None),
    (torch.float32, True, None),  # bf16-mixed: the matmuls round to bfloat16, the input stays float32
])
@pytest.mark.parametrize("scale", [0.1, 1.0, 30.0])
def test_vat_default_direction_is_the_exact_power_iteration_in_every_dtype(dtype, autocast, min_cos, scale,
                                                                             iterations):
    torch.manual_seed(0)
    net64 = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5)).double()
    with torch.no_grad():
        net64[0].weight /= scale  # the same function of x / scale: ξ must follow the input's scale
    x64 = torch.randn(32, 16, dtype=torch.float64) * scale
    net, x = net64.to(dtype), x64.to(dtype)  # Module.to works in place: net64 is net from here on
    ref = copy.deepcopy(net).double()  # the exact reference has the very weights the low-precision run has
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        clean = net(x).detach()
        d = virtual_adversarial_direction(lambda r: kl_divergence(clean, net(x + r)), x,
                                          power_iterations=iterations, generator=torch.Generator().manual_seed(3))
    start = ascent_direction(torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=dtype), "l2")
    exact = _exact_power_iteration(ref, x.double(), start.double(), iterations)
    cos = (d.double() * exact).sum(1).abs()
    if min_cos is not None:
        assert cos.min() > min_cos, (cos.min(), cos.median())
    else:
        assert cos.median() > 0.97 and cos.quantile(0.1) > 0.85, (cos.median(), cos.quantile(0.1))


def test_a_fixed_tiny_xi_is_what_the_default_avoids():
    """The control: the paper code's ξ = 1e-6 in float32 gives directions far from the exact one."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    x = torch.randn(32, 16)
    clean = net(x).detach()
    d = virtual_adversarial_direction(lambda r: kl_divergence(clean, net(x + r)), x, xi=1e-6,
                                      generator=torch.Generator().manual_seed(3))
    start = ascent_direction(torch.randn(x.shape, generator=torch.Generator().manual_seed(3)), "l2")
    exact = _exact_power_iteration(copy.deepcopy(net).double(), x.double(), start.double(), 1)
    assert (d.double() * exact).sum(1).abs().min() < 0.9


def test_compute_dtype_follows_autocast_only_towards_less_precision():
    x = torch.zeros(3)
    assert compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(x) == torch.bfloat16
        assert compute_dtype(x.double()) == torch.bfloat16
        assert compute_dtype(torch.zeros(3, dtype=torch.long)) == torch.long
    assert difference_scale(torch.float64) < difference_scale(torch.float32) < difference_scale(torch.bfloat16)


def test_default_xi_is_relative_to_each_sample_and_fills_zero_samples():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.3, 0.4]])
    xi = virtual_adversarial_xi(x).squeeze(1)
    s = difference_scale(torch.float32)
    torch.testing.assert_close(xi, torch.tensor([5 * s, 2.75 * s, 0.5 * s]))
    assert torch.equal(virtual_adversarial_xi(torch.zeros(2, 3)).squeeze(1), torch.full((2,), s))
