"""Property-based tests (hypothesis): random shapes, both float dtypes and degenerate inputs.

Tensors are drawn from a seed, a shape, a kind (normal, zeros, constant, one dead sample) and a scale
spanning many orders of magnitude, kept where the dtype can represent ‖t‖² (torch.linalg.vector_norm
over- and underflows at the same points; matching it there is the property).
"""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_gp.functional.adversarial import fgsm, pgd
from lightning_gp.functional.gan import interpolate
from lightning_gp.functional.gradients import per_sample_norm, per_sample_squared_norm
from lightning_gp.functional.penalties import gradient_norm_penalty

SETTINGS = settings(max_examples=25, deadline=None)
DTYPES = st.sampled_from([torch.float32, torch.float64])
SHAPES = st.tuples(st.integers(1, 8), st.lists(st.integers(1, 4), min_size=1, max_size=4)).map(
    lambda t: (t[0], *t[1])
)
KINDS = st.sampled_from(["normal", "zeros", "constant", "one_zero_sample"])


def _scales(dtype):
    return [1e-15, 1e-6, 1.0, 1e6, 1e15] if dtype == torch.float32 else [1e-100, 1e-6, 1.0, 1e6, 1e100]


@st.composite
def tensors(draw, dtype=None):
    dtype = draw(DTYPES) if dtype is None else dtype
    shape = draw(SHAPES)
    kind = draw(KINDS)
    scale = draw(st.sampled_from(_scales(dtype)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "zeros":
        t = torch.zeros(shape, dtype=dtype)
    elif kind == "constant":
        t = torch.full(shape, draw(st.sampled_from([-1.0, 0.5, 3.0])), dtype=dtype)
    else:
        t = torch.randn(shape, generator=gen, dtype=dtype)
        if kind == "one_zero_sample":
            t[draw(st.integers(0, shape[0] - 1))] = 0
    return t * scale


def _reference_norm(t):
    return torch.linalg.vector_norm(t.double().flatten(1), dim=1)


@SETTINGS
@given(tensors())
def test_per_sample_norm_matches_linalg_and_is_homogeneous(t):
    n = per_sample_norm(t)
    assert n.shape == (t.shape[0],) and n.dtype == t.dtype
    torch.testing.assert_close(n.double(), _reference_norm(t), rtol=1e-5, atol=0)
    torch.testing.assert_close(per_sample_squared_norm(t).double(), _reference_norm(t) ** 2, rtol=1e-5, atol=0)
    torch.testing.assert_close(per_sample_norm(-2 * t), 2 * n, rtol=1e-5, atol=0)


@SETTINGS
@given(tensors())
def test_per_sample_norm_gradient_is_finite_and_at_most_unit(t):
    t = t.clone().requires_grad_()
    (g,) = torch.autograd.grad(per_sample_norm(t).sum(), t)
    assert torch.isfinite(g).all()
    gn = _reference_norm(g.detach())
    live = _reference_norm(t.detach()) > 0
    torch.testing.assert_close(gn[live], torch.ones_like(gn[live]), rtol=1e-4, atol=0)
    assert (gn[~live] == 0).all()


@SETTINGS
@given(tensors(), st.sampled_from([1, 1.5, 2, 3]), st.sampled_from([0.0, 1.0]), st.booleans())
def test_gradient_norm_penalty_matches_definition(t, power, center, one_sided):
    if t.dtype == torch.float32 and float(t.abs().max()) > 1e6 and power > 2:
        t = t / 1e9  # (1e15·√n)³ overflows float32; the property is about the formula, not overflow
    phi = gradient_norm_penalty(t, power=power, center=center, one_sided=one_sided)
    gap = _reference_norm(t) - center
    if one_sided:
        gap = gap.clamp_min(0)
    torch.testing.assert_close(phi.double(), gap.abs() ** power, rtol=1e-4, atol=1e-30)
    assert phi.shape == (t.shape[0],) and (phi >= 0).all()
    tg = t.clone().requires_grad_()
    (g,) = torch.autograd.grad(gradient_norm_penalty(tg, power=power, center=center, one_sided=one_sided).sum(), tg)
    assert torch.isfinite(g).all()


@SETTINGS
@given(st.data())
def test_interpolate_is_per_sample_convex_combination(data):
    real = data.draw(tensors())
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    fake = torch.randn(real.shape, generator=gen, dtype=real.dtype) * data.draw(st.sampled_from(_scales(real.dtype)))
    x_hat = interpolate(real, fake)
    assert x_hat.shape == real.shape and x_hat.dtype == real.dtype
    lo, hi = torch.minimum(real, fake), torch.maximum(real, fake)
    slack = 1e-5 * torch.maximum(real.abs(), fake.abs())
    assert ((x_hat >= lo - slack) & (x_hat <= hi + slack)).all()
    # One α per sample: recover it from the coordinate where real and fake differ most.
    b = real.shape[0]
    diff = (real - fake).reshape(b, -1)
    idx = diff.abs().argmax(dim=1)
    rows = torch.arange(b)
    alpha = ((x_hat - fake).reshape(b, -1)[rows, idx] / diff[rows, idx])
    ok = diff[rows, idx].abs() > 0
    expected = alpha[:, None] * real.reshape(b, -1) + (1 - alpha[:, None]) * fake.reshape(b, -1)
    torch.testing.assert_close(x_hat.reshape(b, -1)[ok], expected[ok], rtol=1e-4,
                               atol=float(1e-4 * torch.maximum(real.abs(), fake.abs()).max()))
    # Endpoints are exact.
    assert torch.equal(interpolate(real, fake, torch.ones(b)), real)
    assert torch.equal(interpolate(real, fake, torch.zeros(b)), fake)


def _loss_fn(w):
    return lambda inp: torch.tanh(inp * w).flatten(1).sum(dim=1)


@SETTINGS
@given(st.data(), st.sampled_from(["l2", "linf"]), st.sampled_from([0.0, 1e-3, 0.1, 2.0]),
       st.sampled_from([None, (0.0, 1.0), (-1.0, 1.0)]), st.integers(1, 4), st.booleans())
def test_fgsm_pgd_stay_in_ball_and_clamp_range(data, norm, eps, clamp, steps, random_start):
    x = data.draw(tensors())
    if clamp is not None:
        x = x.clamp(*clamp)  # the ball is about clean inputs inside the valid range
    w = torch.randn(x.shape[1:], dtype=x.dtype)
    if data.draw(st.booleans()):
        w[..., 0] = 0  # some coordinates with zero gradient
    x_before = x.clone()
    if steps == 1 and not random_start:
        adv = fgsm(_loss_fn(w), x, epsilon=eps, norm=norm, clamp=clamp)
    else:
        adv = pgd(_loss_fn(w), x, epsilon=eps, norm=norm, steps=steps, step_size=max(eps, 1e-3) / 2,
                  random_start=random_start, clamp=clamp)
    assert torch.equal(x, x_before)
    assert adv.shape == x.shape and adv.dtype == x.dtype and not adv.requires_grad
    assert torch.isfinite(adv).all()
    delta = (adv - x).double().flatten(1)
    rounding = 8 * torch.finfo(x.dtype).eps * x.double().abs().flatten(1).amax(dim=1)  # ulp of x + δ
    if norm == "l2":
        size, allowed = delta.norm(dim=1), eps * (1 + 1e-5) + rounding * math.sqrt(delta.shape[1])
    else:
        size, allowed = delta.abs().amax(dim=1), eps * (1 + 1e-5) + rounding
    assert (size <= allowed).all(), (size, allowed)
    if clamp is not None:
        assert (adv >= clamp[0]).all() and (adv <= clamp[1]).all()
    if eps == 0:
        assert torch.equal(adv, x)
