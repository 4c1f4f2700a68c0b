"""Fuzz and property suite of the pure-torch layer (issue #12): every public function of ``lightning_gp.functional``
and ``lightning_gp.manual`` under bad types, NaN/Inf in inputs, weights and losses, B = 0 and 1, every floating
dtype, non-contiguous and channels_last inputs, frozen and parameter-free models, dropout on every
finite-difference path and zero weights.

Each case asserts one of two outcomes: a clear error naming the argument, the bad value and the fix, or the right
answer against an independent computation (torch.func, torch.linalg, a hand-written loop, a closed form).
Non-finite input may give a visibly non-finite result, never a finite one.
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import lightning_gp.functional as LF
from lightning_gp.functional import (
    chain_layers,
    data_gradient_penalty,
    data_gradient_penalty_fd,
    difference_penalty,
    fgsm,
    gradient_norm_penalty,
    input_gradient,
    interpolate,
    linear_squared_norms,
    mlp_inequality,
    output_gradient,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
    per_sample_grad_norms,
    per_sample_grad_norms_by_layer,
    per_sample_norm,
    per_sample_output_gradient_norms,
    per_sample_squared_norm,
    perturbed_output,
    pgd,
    r1_penalty,
    r2_penalty,
    spectral_norm,
    spectral_norm_penalty,
    wgan_gradient_penalty,
    wgan_gradient_penalty_fd,
)
from lightning_gp.manual import PenaltyMixin, penalized_loss

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
NAN, INF = math.nan, math.inf
FEW = settings(max_examples=100, deadline=None)


def _mlp(d=3, hidden=8, act=nn.Tanh, dtype=torch.float32, dropout=0.0):
    layers = [nn.Linear(d, hidden), act()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(hidden, 1)).to(dtype)


def _per_sample(model):
    return lambda inp: model(inp)[:, 0]


def _ce(model, y):
    return lambda inp: F.cross_entropy(model(inp), y, reduction="none")


def _nonfinite(*tensors):
    """True when some value is NaN or inf: the non-finite input is visible in the result."""
    return any(not bool(torch.isfinite(t).all()) for t in tensors)


def _layout(x, kind):
    if kind == "transposed":  # a non-contiguous view with the same values
        return x.transpose(0, -1).contiguous().transpose(0, -1)
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _reference_norm(t):
    return torch.linalg.vector_norm(t.double().reshape(t.shape[0], math.prod(t.shape[1:])), dim=1)


# --- per_sample_norm and per_sample_squared_norm ---------------------------------------------------------


@FEW
@given(
    batch=st.integers(0, 4),
    shape=st.sampled_from([(), (3,), (2, 3), (2, 3, 2)]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(["contiguous", "transposed", "channels_last"]),
    scale=st.sampled_from([1e-3, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
def test_per_sample_norm_matches_linalg(batch, shape, dtype, layout, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(batch, *shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    if layout == "channels_last" and x.ndim != 4:
        layout = "transposed"
    x = _layout(x, layout)
    norms, squares = per_sample_norm(x), per_sample_squared_norm(x)
    assert norms.shape == squares.shape == (batch,)
    assert norms.dtype == squares.dtype == dtype
    ref = _reference_norm(x)
    fits = ref.square() < torch.finfo(dtype).max  # a squared norm beyond the dtype's range is honestly inf
    assert bool(torch.isinf(squares[~fits]).all())
    rtol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    atol = 1e-7 if dtype == torch.float16 else 0  # float16 subnormals (|x| < 6e-5) have absolute precision 6e-8
    torch.testing.assert_close(norms.double(), ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(squares[fits].double(), ref[fits].square(), rtol=2 * rtol, atol=atol)


def test_per_sample_norm_half_does_not_overflow_where_vector_norm_does_not():
    x = torch.full((2, 300), 100.0, dtype=torch.float16)  # Σx² = 3e6 > float16's max 65504, ‖x‖ = 1732
    expected = torch.linalg.vector_norm(x, dim=1)
    assert bool(torch.isfinite(expected).all())
    torch.testing.assert_close(per_sample_norm(x), expected)
    assert per_sample_norm(x.bfloat16()).dtype == torch.bfloat16
    # The squared norm itself does not fit in float16: inf is the honest value there.
    assert bool(torch.isinf(per_sample_squared_norm(x)).all())


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_sample_norm_gradient_is_zero_at_zero_also_twice(dtype):
    x = torch.zeros(3, 4, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(per_sample_norm(x).sum(), x, create_graph=True)
    assert torch.equal(g, torch.zeros_like(g))
    (gg,) = torch.autograd.grad(g.sum(), x, allow_unused=True, materialize_grads=True)
    assert bool(torch.isfinite(gg).all())


@FEW
@given(bad=st.sampled_from([NAN, INF, -INF]), row=st.integers(0, 2), dtype=st.sampled_from(DTYPES))
def test_per_sample_norm_keeps_nonfinite_rows_visible(bad, row, dtype):
    x = torch.randn(3, 4).to(dtype)
    x[row, 1] = bad
    norms = per_sample_norm(x)
    expected = NAN if math.isnan(bad) else INF
    assert math.isnan(norms[row]) if math.isnan(expected) else math.isinf(norms[row])
    others = [i for i in range(3) if i != row]
    assert bool(torch.isfinite(norms[others]).all())  # one bad row does not spoil the others
    assert _nonfinite(per_sample_squared_norm(x))


# --- gradient_norm_penalty: closed form, NaN, dtypes ------------------------------------------------------


@FEW
@given(
    power=st.sampled_from([1, 1.5, 2, 3]),
    center=st.sampled_from([0.0, 0.5, 1.0]),
    one_sided=st.booleans(),
    batch=st.integers(0, 4),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_gradient_norm_penalty_closed_form(power, center, one_sided, batch, dtype, seed):
    g = torch.randn(batch, 2, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    g[:1] = 0  # a dead-ReLU sample
    out = gradient_norm_penalty(g.to(dtype), power=power, center=center, one_sided=one_sided)
    gap = _reference_norm(g) - center
    if one_sided:
        gap = gap.clamp_min(0)
    assert out.shape == (batch,) and out.dtype == dtype
    rtol = {torch.float16: 5e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-6)
    torch.testing.assert_close(out.double(), gap.abs().pow(power), rtol=rtol, atol=rtol)


@pytest.mark.parametrize(("power", "center"), [(2, 0.0), (1, 0.0), (3, 0.0), (2, 1.0), (1, 1.0), (1.5, 0.5)])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_gradient_norm_penalty_never_hides_nonfinite_grad(power, center, bad):
    g = torch.randn(3, 4)
    g[1, 2] = bad
    for one_sided in (False, True):
        out = gradient_norm_penalty(g, power=power, center=center, one_sided=one_sided)
        assert not bool(torch.isfinite(out[1])), (power, center, one_sided, out)
        assert bool(torch.isfinite(out[[0, 2]]).all())


# --- bad settings in every entry point: a clear error naming argument, value and fix -------------------------


def _entry_points():
    """(name of the argument, call(value)) for every numeric setting of every functional entry point."""
    model = _mlp()
    x = torch.rand(4, 3)
    xg = x.clone().requires_grad_()
    y = torch.randint(0, 1, (4,))
    clf = nn.Linear(3, 2)
    fn = _per_sample(model)
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    return [
        ("power", lambda v: gradient_norm_penalty(xg, power=v)),
        ("center", lambda v: gradient_norm_penalty(xg, center=v)),
        ("power", lambda v: data_gradient_penalty(fn(xg), xg, power=v)),
        ("center", lambda v: data_gradient_penalty(fn(xg), xg, center=v)),
        ("power", lambda v: data_gradient_penalty_fd(fn, x, model, power=v)),
        ("center", lambda v: data_gradient_penalty_fd(fn, x, model, center=v)),
        ("step", lambda v: data_gradient_penalty_fd(fn, x, model, step=v)),
        ("step", lambda v: parameter_gradient_penalty_fd(lambda: fn(x).mean(), model, step=v)),
        ("center", lambda v: wgan_gradient_penalty(fn, real, fake, center=v)),
        ("center", lambda v: wgan_gradient_penalty_fd(fn, real, fake, model, center=v)),
        ("step", lambda v: wgan_gradient_penalty_fd(fn, real, fake, model, step=v)),
        ("center", lambda v: difference_penalty(fn, real, fake, center=v)),
        ("epsilon", lambda v: fgsm(_ce(clf, y), x, epsilon=v)),
        ("step_size", lambda v: fgsm(_ce(clf, y), x, epsilon=0.1, step_size=v)),
        ("epsilon", lambda v: pgd(_ce(clf, y), x, epsilon=v, steps=2, step_size=0.1)),
        ("step_size", lambda v: pgd(_ce(clf, y), x, epsilon=0.1, steps=2, step_size=v)),
        ("tol", lambda v: mlp_inequality(model, x, lambda out: out[:, 0], tol=v)),
    ]


@pytest.mark.parametrize("value", [INF, -INF, NAN, -1.0, "0.1", True, torch.tensor(0.1)])
def test_every_setting_refuses_meaningless_values(value):
    for arg, call in _entry_points():
        if arg == "power" and value in (-1.0,):
            pass
        with pytest.raises(ValueError, match=rf"`{arg}` must be .*got {re.escape(repr(value))}") as info:
            call(value)
        msg = str(info.value)
        if isinstance(value, float) and not math.isfinite(value):
            assert "finite" in msg, msg
        assert len(msg.split(". ", 1)) == 2 or "finite" in msg, msg  # a sentence saying what to do


def test_power_below_one_and_int_steps_are_refused():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"`power` must be a number >= 1, got 0\.5.*power=1"):
        gradient_norm_penalty(x, power=0.5)
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 1, got inf"):
        pgd(lambda inp: inp.sum(1), x.detach(), epsilon=0.1, steps=INF, step_size=0.1)
    with pytest.raises(ValueError, match=r"`n_iter` must be an integer >= 1, got True"):
        spectral_norm(torch.randn(3, 3), n_iter=True)


def test_fgsm_and_pgd_argument_types():
    clf, x, y = nn.Linear(3, 2), torch.rand(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(TypeError, match=r"`random_start` must be True or False, got int 1"):
        pgd(_ce(clf, y), x, epsilon=0.1, steps=1, step_size=0.1, random_start=1)
    with pytest.raises(TypeError, match=r"`random_start` must be True or False, got str 'yes'"):
        fgsm(_ce(clf, y), x, epsilon=0.1, random_start="yes")
    with pytest.raises(TypeError, match=r"`generator` must be a torch.Generator or None, got int"):
        pgd(_ce(clf, y), x, epsilon=0.1, steps=1, step_size=0.1, generator=0)
    with pytest.raises(TypeError, match=r"`loss_fn` must be a callable mapping inputs to losses, got Tensor"):
        fgsm(x, x, epsilon=0.1)
    with pytest.raises(ValueError, match=r"`clamp` must satisfy lo < hi, got \(0, nan\)"):
        fgsm(_ce(clf, y), x, epsilon=0.1, clamp=(0, NAN))


def test_difference_penalty_center_and_alpha():
    critic = _per_sample(_mlp())
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`center` must be a non-negative number, got -1.*center=1"):
        difference_penalty(critic, real, fake, center=-1)
    with pytest.raises(ValueError, match=r"`center` must be a non-negative number, got nan; it must be finite"):
        difference_penalty(critic, real, fake, center=NAN)
    with pytest.raises(ValueError, match=r"`alpha` must be a pair \(alpha1, alpha2\).*got Tensor"):
        difference_penalty(critic, real, fake, alpha=torch.rand(4))


@pytest.mark.parametrize("alpha", [torch.full((4,), 2.0), torch.tensor([0.5, -0.1, 0.5, 0.5]),
                                   torch.tensor([0.5, NAN, 0.5, 0.5])])
def test_interpolate_refuses_alpha_outside_unit_interval(alpha):
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`alpha` must lie in \[0, 1\].*got values \[.*torch.rand"):
        interpolate(real, fake, alpha)
    with pytest.raises(ValueError, match=r"`alpha` must lie in \[0, 1\]"):
        wgan_gradient_penalty(_per_sample(_mlp()), real, fake, alpha=alpha)
    with pytest.raises(ValueError, match=r"`alpha` must lie in \[0, 1\]"):
        difference_penalty(_per_sample(_mlp()), real, fake, alpha=(torch.rand(4), alpha))


def test_interpolate_refuses_integer_alpha():
    with pytest.raises(TypeError, match=r"`alpha` must be floating point.*torch.int64.*torch.rand\(4\)"):
        interpolate(torch.randn(4, 3), torch.randn(4, 3), torch.ones(4, dtype=torch.long))


@FEW
@given(batch=st.integers(0, 5), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_interpolate_is_on_the_segment(batch, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    real, fake, alpha = torch.randn(batch, 2, 3, generator=g), torch.randn(batch, 2, 3, generator=g), torch.rand(
        batch, generator=g)
    out = interpolate(real.to(dtype), fake.to(dtype), alpha)
    expected = alpha[:, None, None].double() * real.double() + (1 - alpha[:, None, None].double()) * fake.double()
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}.get(dtype, 1e-6)
    assert out.dtype == dtype and out.shape == real.shape
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)


def test_parameter_listed_twice_is_refused():
    w = torch.randn(3, requires_grad=True)
    v = torch.randn(2, requires_grad=True)
    with pytest.raises(ValueError, match=r"`params\[2\]` \(shape \(3,\)\) is the same tensor as `params\[0\]`.*once"):
        parameter_gradient_penalty((w**2).sum() + v.sum(), [w, v, w])
    with pytest.raises(ValueError, match=r"`params\[1\]` .* same tensor as `params\[0\]`"):
        parameter_gradient_penalty_fd(lambda: (w**2).sum(), [w, w])
    model = _mlp()
    with pytest.raises(ValueError, match=r"same tensor as"):
        data_gradient_penalty_fd(_per_sample(model), torch.randn(4, 3), [*model.parameters(), model[0].weight])


# --- NaN / Inf in inputs, weights and losses: never a finite result -----------------------------------------


def _poisoned_model(where, bad):
    torch.manual_seed(0)
    model = _mlp(act=nn.ReLU)
    if where == "weight":
        with torch.no_grad():
            model[0].weight[1, 1] = bad
    return model


def _inputs(where, bad, shape=(4, 3)):
    x = torch.rand(*shape)
    if where == "input":
        x[2, 1] = bad
    return x


def _results(where, bad):
    """Every penalty and norm of the functional layer on a poisoned model, input or loss."""
    model = _poisoned_model(where, bad)
    x = _inputs(where, bad)
    fn = _per_sample(model)
    if where == "loss":
        def fn(inp, model=model):  # a loss that is non-finite for one sample
            out = model(inp)[:, 0]
            factor = torch.ones_like(out)
            factor[min(2, len(out) - 1)] = bad
            return out * factor
    xg = x.clone().requires_grad_()
    out = {}
    for power, center in [(2, 0.0), (1, 0.0), (2, 1.0), (1, 1.0), (3, 0.5)]:
        out[f"data p={power} c={center}"] = data_gradient_penalty(fn(xg), xg, power=power, center=center)
        res = data_gradient_penalty_fd(fn, x, model, power=power, center=center)
        out[f"data_fd p={power} c={center}"] = res.penalty
    out["parameter"] = parameter_gradient_penalty(fn(x).mean(), model)
    out["parameter_fd"] = parameter_gradient_penalty_fd(lambda: fn(x).mean(), model).penalty
    fake = torch.rand(4, 3)
    out["wgan"] = wgan_gradient_penalty(fn, x, fake)
    out["wgan_fd"] = wgan_gradient_penalty_fd(fn, x, fake, model).penalty
    out["r1"] = r1_penalty(fn, x)
    out["r2"] = r2_penalty(fn, x)
    out["difference"] = difference_penalty(fn, x, fake)
    for norm in ("l2", "linf"):
        loss = lambda inp: fn(inp) ** 2  # noqa: E731
        out[f"fgsm {norm}"] = fgsm(loss, x, epsilon=0.1, norm=norm)
        out[f"pgd {norm}"] = pgd(loss, x, epsilon=0.1, norm=norm, steps=2, step_size=0.05)
    out["output_gradient_norms"] = per_sample_output_gradient_norms(lambda: fn(x).sum(), model[0])
    out["output_gradient"] = output_gradient(lambda: fn(x).sum(), model[0])[1]
    return out


@pytest.mark.parametrize("where", ["input", "weight", "loss"])
@pytest.mark.parametrize("bad", [NAN, INF])
def test_nonfinite_never_gives_a_finite_result(where, bad):
    hidden = [name for name, value in _results(where, bad).items() if not _nonfinite(value)]
    assert not hidden, f"a non-finite {where} gives a finite result in {hidden}"


@pytest.mark.parametrize("bad", [NAN, INF])
def test_nonfinite_weight_in_spectral_norm(bad):
    w = torch.randn(4, 3)
    w[1, 1] = bad
    assert _nonfinite(spectral_norm(w)[0])
    layer = nn.Linear(3, 4)
    with torch.no_grad():
        layer.weight[0, 0] = bad
    assert _nonfinite(spectral_norm_penalty(layer))


def test_nonfinite_parameter_gradient_penalty_fd_grads():
    w = torch.tensor([1.0, NAN], requires_grad=True)
    res = parameter_gradient_penalty_fd(lambda: (w**2).sum(), [w])
    assert _nonfinite(res.penalty) and _nonfinite(*res.grads)


# --- B = 0 and B = 1 -----------------------------------------------------------------------------------------


EMPTY_IS_ERROR = {
    "data_gradient_penalty": lambda m, x: data_gradient_penalty(_per_sample(m)(x.requires_grad_()), x),
    "data_gradient_penalty_fd": lambda m, x: data_gradient_penalty_fd(_per_sample(m), x, m),
    "wgan_gradient_penalty": lambda m, x: wgan_gradient_penalty(_per_sample(m), x, x),
    "wgan_gradient_penalty_fd": lambda m, x: wgan_gradient_penalty_fd(_per_sample(m), x, x, m),
    "r1_penalty": lambda m, x: r1_penalty(_per_sample(m), x),
    "r2_penalty": lambda m, x: r2_penalty(_per_sample(m), x),
    "difference_penalty": lambda m, x: difference_penalty(_per_sample(m), x, x),
}


@pytest.mark.parametrize("name", sorted(EMPTY_IS_ERROR))
def test_empty_batch_to_a_mean_is_a_clear_error(name):
    args = {"data_gradient_penalty": "inputs", "data_gradient_penalty_fd": "inputs", "r2_penalty": "fake"}
    arg = args.get(name, "real")
    with pytest.raises(ValueError, match=rf"`{arg}` is an empty batch \(shape \(0, 3\)\).*B = 0.*drop_last"):
        EMPTY_IS_ERROR[name](_mlp(), torch.zeros(0, 3))


def test_empty_batch_to_a_norm_or_a_perturbation_is_empty():
    model, x = _mlp(), torch.zeros(0, 3)
    assert per_sample_norm(x).shape == per_sample_squared_norm(x).shape == (0,)
    assert per_sample_norm(torch.zeros(0)).shape == (0,)
    assert gradient_norm_penalty(x, center=1.0).shape == (0,)
    xg = x.clone().requires_grad_()
    assert input_gradient(_per_sample(model)(xg), xg).shape == (0, 3)
    assert interpolate(x, x).shape == (0, 3)
    for norm in ("l2", "linf"):
        assert fgsm(_per_sample(model), x, epsilon=0.1, norm=norm).shape == (0, 3)
        assert fgsm(_per_sample(model), x, epsilon=0.1, norm=norm, random_start=True).shape == (0, 3)
        assert pgd(_per_sample(model), x, epsilon=0.1, norm=norm, steps=2, step_size=0.1, clamp=(0, 1)).shape == (0, 3)
    assert per_sample_output_gradient_norms(lambda: model(x).sum(), model[0]).shape == (0,)


def test_batch_of_one_matches_closed_form():
    lin = nn.Linear(3, 1)
    x = torch.randn(1, 3, requires_grad=True)
    w = lin.weight.detach()
    torch.testing.assert_close(data_gradient_penalty(lin(x), x, center=1.0), (w.norm() - 1) ** 2)
    torch.testing.assert_close(r1_penalty(lin, x.detach()), w.square().sum())
    torch.testing.assert_close(per_sample_norm(x.detach()), x.detach().norm(dim=1))
    res = data_gradient_penalty_fd(lin, x.detach(), lin, power=2, center=1.0)
    torch.testing.assert_close(res.penalty, (w.norm() - 1) ** 2)


# --- every floating dtype, layouts ----------------------------------------------------------------------------


def _torch_func_data_penalty(model, x, power, center):
    """mean φ(‖∇ₓfᵢ‖) by torch.func, independently of the package."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def f(xi):
        return functional_call(model, params, (xi[None],))[0, 0]

    grads = vmap(grad(f))(x)
    norms = torch.linalg.vector_norm(grads.reshape(len(x), -1), dim=1)
    return ((norms - center).abs() ** power).mean()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("power", "center"), [(2, 0.0), (1, 0.0), (2, 1.0)])
def test_data_penalty_every_dtype_against_torch_func(dtype, power, center):
    torch.manual_seed(1)
    ref_model = _mlp(d=5, hidden=16, dtype=torch.float64)
    x64 = torch.randn(6, 5, dtype=torch.float64)
    expected = _torch_func_data_penalty(ref_model, x64, power, center)
    model = _mlp(d=5, hidden=16).to(dtype)
    model.load_state_dict(ref_model.state_dict())
    x = x64.to(dtype).requires_grad_()
    out = data_gradient_penalty(_per_sample(model)(x), x, power=power, center=center)
    assert out.dtype == dtype
    tol = {torch.float16: 2e-2, torch.bfloat16: 8e-2}.get(dtype, 1e-5)
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol)
    fd = data_gradient_penalty_fd(_per_sample(model), x.detach(), model, power=power, center=center)
    torch.testing.assert_close(fd.penalty.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", ["transposed", "channels_last"])
def test_noncontiguous_and_channels_last_inputs_give_the_same_answer(layout):
    torch.manual_seed(2)
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 2))
    x = torch.rand(5, 3, 5, 5)
    y = torch.randint(0, 2, (5,))
    xl = _layout(x, layout)
    assert not xl.is_contiguous()

    def penalty(inp):
        inp = inp.clone().requires_grad_()
        return data_gradient_penalty(F.cross_entropy(conv(inp), y, reduction="none"), inp, center=1.0)

    torch.testing.assert_close(penalty(xl), penalty(x))
    torch.testing.assert_close(per_sample_norm(xl), per_sample_norm(x))
    torch.testing.assert_close(fgsm(_ce(conv, y), xl, epsilon=0.1), fgsm(_ce(conv, y), x, epsilon=0.1))
    torch.testing.assert_close(r1_penalty(lambda inp: conv(inp)[:, 0], xl), r1_penalty(lambda inp: conv(inp)[:, 0], x))


# --- fgsm / pgd: the ball, the box, the direct step ------------------------------------------------------------


@FEW
@given(
    norm=st.sampled_from(["l2", "linf"]),
    epsilon=st.floats(0.0, 0.5),
    random_start=st.booleans(),
    steps=st.integers(1, 3),
    clamp=st.sampled_from([None, (0.0, 1.0)]),
    batch=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_attacks_stay_in_the_ball_and_the_box(norm, epsilon, random_start, steps, clamp, batch, seed):
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(6, 3)
    x = torch.rand(batch, 6, generator=g)
    y = torch.randint(0, 3, (batch,), generator=g)
    for adv in (
        fgsm(_ce(clf, y), x, epsilon=epsilon, norm=norm, random_start=random_start, clamp=clamp, generator=g),
        pgd(_ce(clf, y), x, epsilon=epsilon, norm=norm, steps=steps, step_size=0.1, random_start=random_start,
            clamp=clamp, generator=g),
    ):
        delta = (adv - x).double()
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= epsilon * (1 + 1e-5) + 1e-6).all())
        if clamp is not None:
            assert bool(((adv >= 0) & (adv <= 1)).all())


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_attacks_refuse_inputs_outside_the_clamp_box(norm):
    clf, y = nn.Linear(3, 2), torch.randint(0, 2, (4,))
    x = torch.rand(4, 3) * 10  # standardized-looking inputs, not pixels in [0, 1]
    msg = r"`inputs` must lie inside `clamp` = \(0\.0, 1\.0\), got values in \[.*\].*further than `epsilon`"
    with pytest.raises(ValueError, match=msg):
        fgsm(_ce(clf, y), x, epsilon=0.1, norm=norm, clamp=(0, 1))
    with pytest.raises(ValueError, match=msg):
        pgd(_ce(clf, y), x, epsilon=0.1, norm=norm, steps=2, step_size=0.05, clamp=(0, 1))
    adv = fgsm(_ce(clf, y), x, epsilon=0.1, norm=norm, clamp=(0, 10))  # the range they live in: fine
    assert float((adv - x).abs().max()) <= 0.1 + 1e-6


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_fgsm_is_one_direct_step_against_a_hand_computation(norm):
    torch.manual_seed(3)
    clf, x, y = nn.Linear(5, 3), torch.rand(6, 5), torch.randint(0, 3, (6,))
    xr = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(F.cross_entropy(clf(xr), y, reduction="sum"), xr)
    step = g.sign() if norm == "linf" else g / g.norm(dim=1, keepdim=True)
    expected = (x + 0.2 * step).clamp(0, 1)
    torch.testing.assert_close(fgsm(_ce(clf, y), x, epsilon=0.2, norm=norm, clamp=(0, 1)), expected)
    # A step_size above ε is cut to ε (the ball), below it is taken as is.
    torch.testing.assert_close(fgsm(_ce(clf, y), x, epsilon=0.2, norm=norm, step_size=5.0, clamp=(0, 1)), expected)
    torch.testing.assert_close(fgsm(_ce(clf, y), x, epsilon=0.2, norm=norm, step_size=0.1),
                               x + 0.1 * step)


def test_fgsm_linf_with_nan_gradient_is_not_a_zero_step():
    x = torch.rand(3, 4)
    w = torch.tensor([1.0, NAN, 1.0, 1.0])
    adv = fgsm(lambda inp: (inp * w).sum(1), x, epsilon=0.1, norm="linf")
    assert _nonfinite(adv)


# --- finite differences under train-mode Dropout: the same masks in both passes ------------------------------


def _cos(a, b):
    a, b = torch.cat([t.reshape(-1) for t in a]), torch.cat([t.reshape(-1) for t in b])
    return float(F.cosine_similarity(a, b, dim=0)), float((a - b).norm() / b.norm())


def _dropout_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Dropout(0.5), nn.Linear(32, 32), nn.Tanh(),
                          nn.Dropout(0.3), nn.Linear(32, 1)).double()
    return model.train()


@pytest.mark.parametrize(("power", "center"), [(2, 0.0), (2, 1.0), (1, 0.0)])
def test_data_penalty_fd_replays_dropout(power, center):
    model = _dropout_model()
    x = torch.randn(16, 5, dtype=torch.float64)
    params = list(model.parameters())
    torch.manual_seed(10)
    xg = x.clone().requires_grad_()
    exact = data_gradient_penalty(_per_sample(model)(xg), xg, power=power, center=center)
    exact_grads = torch.autograd.grad(exact, params, materialize_grads=True)
    after_exact = torch.randn(3)
    torch.manual_seed(10)
    res = data_gradient_penalty_fd(_per_sample(model), x, model, power=power, center=center, step=1e-5)
    after_fd = torch.randn(3)
    torch.testing.assert_close(res.penalty, exact.detach())
    cos, rel = _cos(res.grads, exact_grads)
    assert cos > 0.99 and rel < 1e-3, (cos, rel)
    assert torch.equal(after_fd, after_exact)  # the second pass did not consume the run's random stream


def test_parameter_penalty_fd_replays_dropout():
    model = _dropout_model()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    params = list(model.parameters())
    torch.manual_seed(11)
    exact = parameter_gradient_penalty(F.mse_loss(model(x), y), model)
    exact_grads = torch.autograd.grad(exact, params)
    torch.manual_seed(11)
    res = parameter_gradient_penalty_fd(lambda: F.mse_loss(model(x), y), model, step=1e-6)
    torch.testing.assert_close(res.penalty, exact.detach())
    cos, rel = _cos(res.grads, exact_grads)
    assert cos > 0.99 and rel < 1e-3, (cos, rel)


def test_wgan_penalty_fd_replays_dropout():
    model = _dropout_model()
    real, fake, alpha = torch.randn(16, 5).double(), torch.randn(16, 5).double(), torch.rand(16).double()
    torch.manual_seed(12)
    exact = wgan_gradient_penalty(_per_sample(model), real, fake, alpha=alpha)
    exact_grads = torch.autograd.grad(exact, list(model.parameters()), materialize_grads=True)
    torch.manual_seed(12)
    res = wgan_gradient_penalty_fd(_per_sample(model), real, fake, model, alpha=alpha, step=1e-5)
    cos, rel = _cos(res.grads, exact_grads)
    assert cos > 0.99 and rel < 1e-3, (cos, rel)


# --- zero weights --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 4), (3, 8), (6, 2, 3, 3)])
def test_spectral_norm_recovers_after_a_zero_weight(shape):
    w = torch.zeros(shape, requires_grad=True)
    sigma, u = spectral_norm(w)
    assert float(sigma.detach()) == 0.0
    with torch.no_grad():
        w.copy_(torch.randn(shape))
    sigma, u = spectral_norm(w, u=u)
    expected = torch.linalg.matrix_norm(w.detach().reshape(shape[0], -1), 2)
    torch.testing.assert_close(sigma.detach(), expected, rtol=1e-3, atol=0)
    (g,) = torch.autograd.grad(sigma, w)
    assert float(g.norm()) > 0  # penalised, not stuck at σ = 0


def test_spectral_norm_penalty_recovers_zero_init_heads():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    nn.init.zeros_(model[2].weight)  # a zero-init head (or LoRA's B)
    state = {}
    sq = spectral_norm_penalty(model, vectors=state)
    torch.testing.assert_close(sq.detach(), torch.linalg.matrix_norm(model[0].weight.detach(), 2) ** 2, rtol=1e-3,
                               atol=0)
    with torch.no_grad():
        model[2].weight.normal_()
    expected = sum(torch.linalg.matrix_norm(model[i].weight.detach(), 2) ** 2 for i in (0, 2))
    torch.testing.assert_close(spectral_norm_penalty(model, vectors=state).detach(), expected, rtol=1e-3, atol=0)


def test_zero_weights_give_zero_penalties_with_finite_gradients():
    model = _mlp(act=nn.ReLU)
    for p in model.parameters():
        nn.init.zeros_(p)
    x = torch.randn(4, 3, requires_grad=True)
    for center, power in [(0.0, 2), (1.0, 2), (0.0, 1), (0.5, 3)]:
        pen = data_gradient_penalty(model(x)[:, 0], x, power=power, center=center)
        torch.testing.assert_close(pen.detach(), torch.tensor(center**power))
        grads = torch.autograd.grad(pen, list(model.parameters()), materialize_grads=True)
        assert not _nonfinite(*grads)
        res = data_gradient_penalty_fd(_per_sample(model), x.detach(), model, power=power, center=center)
        assert not _nonfinite(res.penalty, *res.grads)


# --- spectral: bad weights ------------------------------------------------------------------------------------


def test_spectral_bad_weights():
    with pytest.raises(TypeError, match=r"`weight` must be floating point, got dtype torch.int64.*\.float\(\)"):
        spectral_norm(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`LazyLinear.weight` is an uninitialized parameter.*Run one forward pass"):
        spectral_norm_penalty(nn.LazyLinear(3))
    with pytest.raises(ValueError, match=r"`0.weight` is an uninitialized parameter"):
        spectral_norm_penalty(nn.Sequential(nn.LazyLinear(3)))
    state = {}
    spectral_norm_penalty(nn.Sequential(nn.Linear(3, 4)), vectors=state)
    with pytest.raises(ValueError, match=r"`vectors\['0'\]` has shape \(4,\), but layer '0' has 8 outputs.*fresh"):
        spectral_norm_penalty(nn.Sequential(nn.Linear(3, 8)), vectors=state)
    with pytest.raises(TypeError, match=r"`vectors` must be a dict"):
        spectral_norm_penalty(nn.Linear(3, 4), vectors=[])
    with pytest.raises(TypeError, match=r"`u` must be a torch.Tensor, got list"):
        spectral_norm(torch.randn(3, 3), u=[1.0, 0.0, 0.0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_norm_every_dtype(dtype):
    w = torch.randn(6, 4, dtype=torch.float64)
    sigma, _ = spectral_norm(w.to(dtype))
    tol = {torch.float16: 1e-2, torch.bfloat16: 3e-2}.get(dtype, 1e-4)
    torch.testing.assert_close(sigma.double(), torch.linalg.matrix_norm(w, 2), rtol=tol, atol=0)


# --- frozen and parameter-free models -------------------------------------------------------------------------


def test_frozen_and_parameter_free_models():
    frozen = _mlp().requires_grad_(False)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`params` holds no tensors that require grad.*trainable"):
        parameter_gradient_penalty(frozen(x).sum(), frozen)
    with pytest.raises(ValueError, match=r"`params` holds no tensors that require grad"):
        data_gradient_penalty_fd(_per_sample(frozen), x, frozen)
    # A frozen (or parameter-free) function still has an input gradient: ∇ₓ Σ xᵢ² = 2x.
    xg = x.clone().requires_grad_()
    torch.testing.assert_close(data_gradient_penalty((xg**2).sum(1), xg), (4 * x.square().sum(1)).mean())
    xg = x.clone().requires_grad_()
    assert data_gradient_penalty(frozen(xg)[:, 0], xg).requires_grad
    torch.testing.assert_close(r1_penalty(lambda inp: inp.sum(1), x), torch.tensor(3.0))


# --- bad types across the API -------------------------------------------------------------------------------


def test_non_tensor_inputs_name_the_argument():
    model = _mlp()
    cases = [
        (lambda: per_sample_norm([1.0, 2.0]), r"`t` must be a torch.Tensor, got list"),
        (lambda: gradient_norm_penalty(None), r"`t` must be a torch.Tensor, got NoneType"),
        (lambda: data_gradient_penalty_fd(_per_sample(model), [[1.0] * 3], model), r"`inputs` must be a torch"),
        (lambda: interpolate(torch.zeros(2, 3), 0.0), r"`fake` must be a torch.Tensor, got float"),
        (lambda: fgsm(_per_sample(model), 1.0, epsilon=0.1), r"`inputs` must be a torch.Tensor, got float"),
        (lambda: spectral_norm("w"), r"`weight` must be a torch.Tensor, got str"),
        (lambda: spectral_norm_penalty(torch.zeros(3, 3)), r"`module` must be an nn.Module, got Tensor"),
        (lambda: parameter_gradient_penalty(torch.zeros(()), [1.0]), r"`params\[0\]` must be a torch.Tensor"),
    ]
    for call, msg in cases:
        with pytest.raises(TypeError, match=msg):
            call()
    with pytest.raises(TypeError, match=r"`grad` must be floating point.*got dtype torch.int64.*\.float\(\)"):
        gradient_norm_penalty(torch.ones(3, 2, dtype=torch.long))


def test_bad_loss_shapes_name_the_fix():
    model = _mlp()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`fn\(inputs\)` must hold one value per sample.*reduction='none'"):
        data_gradient_penalty_fd(lambda inp: model(inp).sum(), x, model)
    with pytest.raises(ValueError, match=r"`loss_fn\(\)` must be a scalar.*\.mean\(\)"):
        parameter_gradient_penalty_fd(lambda: model(x), model)


# --- mlp_inequality, per_sample_grad_norms: the API boundary ----------------------------------------------------


def test_mlp_inequality_boundary():
    model = _mlp(d=3, hidden=5)
    x = torch.randn(4, 3)
    r = mlp_inequality(model, x, lambda out: out[:, 0])
    assert bool((r.ratio <= 1 + 1e-5).all())
    x[1, 0] = NAN
    with pytest.raises(ValueError, match=r"`inputs` holds NaN or inf values \(samples \[1\]\).*isfinite"):
        mlp_inequality(model, x, lambda out: out[:, 0])
    with pytest.raises(ValueError, match=r"`inputs` is an empty batch.*B = 0"):
        mlp_inequality(model, torch.zeros(0, 3), lambda out: out[:, 0])
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module.*got function"):
        mlp_inequality(lambda t: t, x, lambda out: out[:, 0])
    with torch.no_grad():
        model[2].weight[0, 3] = INF
    with pytest.raises(ValueError, match=r"`2.weight` holds NaN or inf values \(rows \[0\]\)"):
        mlp_inequality(model, torch.randn(4, 3), lambda out: out[:, 0])


def test_per_sample_grad_norms_boundary():
    model = _mlp(d=3, hidden=5)
    x = torch.randn(4, 3)
    x[2, 1] = NAN
    gx, gt = per_sample_grad_norms(model, x, lambda out: out[:, 0])
    assert _nonfinite(gx[2]) and _nonfinite(gt[2])
    with pytest.raises(ValueError, match=r"must hold one value per sample"):
        per_sample_grad_norms(model, torch.randn(4, 3), lambda out: out.sum())


def test_per_sample_grad_norms_empty_batch():
    model = _mlp()
    gx, gt = per_sample_grad_norms(model, torch.zeros(0, 3), lambda out: out[:, 0])
    assert gx.shape == gt.shape == (0,)
    layers = per_sample_grad_norms_by_layer(model, torch.zeros(0, 3), lambda out: out[:, 0]).layer_squared_norms
    assert set(layers) == {name for name, m in model.named_modules() if list(m.parameters(recurse=False))}
    assert linear_squared_norms(torch.zeros(0, 5, 3), torch.zeros(0, 5, 2)).shape == (0,)


def test_per_sample_grad_norms_token_ids_have_nan_input_norms():
    # Integer inputs are token ids: legal for a model that embeds them; ‖∇ₓ‖ is undefined (NaN), ‖∇θ‖ exact.
    model = nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(12, 1))
    ids = torch.tensor([[1, 2, 1], [3, 0, 6]])
    gx, gt = per_sample_grad_norms(model, ids, lambda out: out[:, 0])
    assert gx.isnan().all()
    params = {k: p.detach() for k, p in model.named_parameters()}
    per = torch.func.vmap(torch.func.grad(
        lambda p, i: torch.func.functional_call(model, p, (i.unsqueeze(0),))[0, 0]), in_dims=(None, 0))(params, ids)
    torch.testing.assert_close(gt, sum(v.reshape(2, -1).square().sum(1) for v in per.values()).sqrt())


def test_chain_layers_boundary():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.Tanh(), nn.Dropout(0.1)), nn.Linear(4, 1)).eval()
    assert [name for name, _ in chain_layers(model)] == ["0", "1.0", "1.1", "2"]
    with pytest.raises(ValueError, match=r"needs a sequential chain \(an nn.Sequential\), got Linear.*allow_non_chain"):
        chain_layers(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"Module '1.1' \(Dropout\) is in training mode"):
        chain_layers(model.train())
    with pytest.raises(TypeError, match=r"`allow_non_chain` must be True or False, got str"):
        mlp_inequality(model.eval(), torch.randn(2, 3), lambda out: out[:, 0], allow_non_chain="yes")


def test_perturbed_output_boundary():
    emb, head = nn.Embedding(10, 4), nn.Linear(4, 1)
    ids = torch.tensor([[1, 2, 3], [4, 5, 0]])
    with pytest.raises(TypeError, match=r"`module` must be an nn.Module.*got function"):
        with perturbed_output(lambda t: t):
            pass
    delta = torch.randn(2, 3, 4)
    with perturbed_output(emb, delta) as rec:
        out = head(emb(ids))
    torch.testing.assert_close(out, head(emb(ids) + delta))  # hand computation
    assert rec.calls == 1
    with perturbed_output(emb) as rec:
        loss = head(emb(ids)).sum()
    (g,) = torch.autograd.grad(loss, rec.delta)
    torch.testing.assert_close(g, head.weight.expand(2, 3, 4))
    empty = torch.zeros(0, 3, dtype=torch.long)
    assert per_sample_output_gradient_norms(lambda: head(emb(empty)).sum(), emb).shape == (0,)


# --- manual: penalized_loss and PenaltyMixin --------------------------------------------------------------------


def test_penalized_loss_errors():
    from lightning_gp.callbacks import DataGradientPenalty, ParameterGradientPenalty

    net = nn.Linear(3, 1)
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss_fn(b):
        return F.mse_loss(net(b[0]), b[1])

    frozen = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match=r"`module` \(Linear\) has no parameter that requires grad.*requires_grad_"):
        penalized_loss(frozen, loss_fn, (x, y), [ParameterGradientPenalty(0.5)])
    with pytest.raises(ValueError, match=r"`module` \(ReLU\) has no parameter .*ParameterGradientPenalty"):
        penalized_loss(nn.ReLU(), loss_fn, (x, y), [DataGradientPenalty(0.5), ParameterGradientPenalty(0.5)])
    # A data penalty needs no parameters of `module`: ∇ₓℓᵢ of the (trainable) net, mean loss ⇒ ℓᵢ = B·L's share.
    total = penalized_loss(frozen, loss_fn, (x, y), [DataGradientPenalty(0.5)])
    r = (net(x) - y)[:, 0]
    torch.testing.assert_close(total, loss_fn((x, y)) + 0.5 * (4 * r.square() * net.weight.square().sum()).mean())
    with pytest.raises(TypeError, match=r"`penalties` must be a sequence of callbacks, got a single one.*\[penalty\]"):
        penalized_loss(net, loss_fn, (x, y), DataGradientPenalty(0.5))
    with pytest.raises(TypeError, match=r"`penalties` must hold lightning_gp callbacks, got str"):
        penalized_loss(net, loss_fn, (x, y), ["data"])
    with pytest.raises(TypeError, match=r"`module` must be an nn.Module \(usually `self`\), got function"):
        penalized_loss(loss_fn, loss_fn, (x, y), [])
    with pytest.raises(TypeError, match=r"`loss_fn` must be a callable.*got Tensor"):
        penalized_loss(net, x, (x, y), [])


def test_penalized_loss_against_closed_form():
    from lightning_gp.callbacks import DataGradientPenalty

    class Net(PenaltyMixin, nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

    net = Net()
    x, y = torch.randn(8, 3), torch.randn(8, 1)

    def loss_fn(b):
        return F.mse_loss(net.lin(b[0]), b[1])

    total = net.penalized_loss(loss_fn, (x, y), [DataGradientPenalty(0.5, center=1.0)])
    # per-sample ∇ₓℓᵢ = 2(fᵢ − yᵢ)·w (mean loss: ℓ = L·B, the callback's default reduction), ‖·‖ = 2|fᵢ − yᵢ|‖w‖
    r = (net.lin(x) - y)[:, 0]
    expected = loss_fn((x, y)) + 0.5 * ((2 * r.abs() * net.lin.weight.norm() - 1) ** 2).mean()
    torch.testing.assert_close(total, expected)


def test_public_api_is_covered():
    covered = {
        "chain_layers", "data_gradient_penalty", "data_gradient_penalty_fd", "difference_penalty", "fgsm",
        "gradient_norm_penalty",
        "input_gradient", "interpolate", "mlp_inequality", "output_gradient", "parameter_gradient_penalty",
        "parameter_gradient_penalty_fd", "per_sample_grad_norms", "per_sample_norm",
        "per_sample_output_gradient_norms", "per_sample_squared_norm", "perturbed_output", "pgd", "r1_penalty",
        "r2_penalty",
        "spectral_norm", "spectral_norm_penalty", "wgan_gradient_penalty", "wgan_gradient_penalty_fd",
        "sam_perturbation", "hessian_max_eigenvalue", "hessian_trace", "noise_scale", "two_batch_noise_scale",
        "per_sample_grad_norms_of_loss", "robust_accuracy", "robust_outcomes", "trades_adversarial", "trades_kl",
        "trades_loss", "grad_align_penalty", "mart_adversarial", "mart_loss", "mart_terms", "awp_parameters",
        "awp_perturbation",
    }
    # Classes and helpers tested elsewhere: result tuples, the recorder and the chain check (test_grad_norms.py,
    # test_mlp_inequality.py), and linear_squared_norms / per_sample_grad_norms_by_layer (grad_norms.py).
    elsewhere = {"GradNormRecorder", "MLPInequality", "NoiseScale", "PenaltyGradient", "PerSampleGradNorms",
                 "RobustOutcome", "linear_squared_norms", "per_sample_grad_norms_by_layer"}
    assert covered | elsewhere == set(LF.__all__)


# --- the gradient noise scale ------------------------------------------------------------------------------------


@FEW
@given(n=st.integers(2, 9), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_noise_scale_is_the_sample_covariance_of_any_gradients(n, d, seed):
    """tr Σ is the trace of the per-sample gradients' sample covariance; |G|² + tr Σ/n is ‖ḡ‖²; the two-batch
    estimate of the same batch split in two equal halves solves the same two equations."""
    g = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    est = LF.noise_scale(g.square().sum(1).mean(), g.mean(0).square().sum(), n)
    cov = torch.atleast_2d(torch.cov(g.T, correction=1))
    torch.testing.assert_close(est.trace_sigma, cov.trace(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(est.grad_sq + est.trace_sigma / n, g.mean(0).square().sum(), rtol=1e-10, atol=1e-12)
    assert math.isclose(float(est.b_simple), float(est.trace_sigma / est.grad_sq), rel_tol=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        LF.two_batch_noise_scale(1.0, 1.0, n, n)


@FEW
@given(b=st.integers(1, 7), width=st.integers(1, 5), reduction=st.sampled_from(["mean", "sum"]),
       seed=st.integers(0, 2**16))
def test_per_sample_norms_of_a_scalar_loss_equal_the_per_sample_route(b, width, reduction, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 2)).double()
    x, y = torch.randn(b, 3, dtype=torch.float64), torch.randint(0, 2, (b,))
    got = LF.per_sample_grad_norms_of_loss(model, lambda: F.cross_entropy(model(x), y, reduction=reduction), b,
                                           reduction=reduction)
    _, want = LF.per_sample_grad_norms(model, x, lambda out: F.cross_entropy(out, y, reduction="none"))
    torch.testing.assert_close(got.param_norms, want, rtol=1e-10, atol=1e-12)


# --- sharpness: SAM's step, the Hessian's top eigenvalue and trace -----------------------------------------------


@FEW
@given(n=st.integers(1, 6), adaptive=st.booleans(), rho=st.sampled_from([0.0, 1e-3, 0.05, 2.0]),
       seed=st.integers(0, 2**16))
def test_sam_perturbation_has_radius_rho(n, adaptive, rho, seed):
    g = torch.Generator().manual_seed(seed)
    theta = [torch.randn(n, generator=g, dtype=torch.float64) + 3, torch.randn(2, 2, generator=g, dtype=torch.float64)]
    grads = [torch.randn_like(t) for t in theta]
    d, h = LF.sam_perturbation(theta, grads, rho=rho, adaptive=adaptive)
    eps = [h * di for di in d]
    # SAM: ‖ε‖ = ρ; ASAM: ‖ε / |θ|‖ = ρ (the step is ρ in the parameter-scaled norm)
    scaled = [e / t.abs() for e, t in zip(eps, theta, strict=True)] if adaptive else eps
    assert math.isclose(float(torch.sqrt(sum((s**2).sum() for s in scaled))), rho, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, NAN, INF, "0.05", None])
def test_sam_perturbation_refuses_bad_rho(bad):
    with pytest.raises(ValueError, match="`rho` must be a non-negative number"):
        LF.sam_perturbation([torch.ones(2)], [torch.ones(2)], rho=bad)


@FEW
@given(n=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_hessian_max_eigenvalue_and_trace_of_a_quadratic(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    h = a @ a.T + torch.diag(torch.arange(1, n + 1, dtype=torch.float64)) * 3  # SPD, a spread spectrum
    w = torch.randn(n, generator=g, dtype=torch.float64, requires_grad=True)
    values = torch.linalg.eigvalsh(h)
    loss = 0.5 * w @ h @ w
    got = LF.hessian_max_eigenvalue(loss, [w], iterations=5000, tol=1e-13, generator=g)
    assert abs(float(got) - float(values[-1])) <= 1e-6 * float(values[-1])
    trace = LF.hessian_trace(0.5 * w @ h @ w, [w], samples=2000, generator=g)
    sd = math.sqrt(2 * (float(h.square().sum()) - float(torch.diagonal(h).square().sum())) / 2000)
    assert abs(float(trace) - float(torch.trace(h))) <= 5 * sd + 1e-9


def test_hessian_functions_refuse_bad_input():
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="`loss` must be a scalar"):
        LF.hessian_max_eigenvalue(w * 2, [w])
    with pytest.raises(ValueError, match="`iterations` must be an integer >= 1"):
        LF.hessian_max_eigenvalue((w**2).sum(), [w], iterations=0)
    with pytest.raises(ValueError, match="`samples` must be an integer >= 1"):
        LF.hessian_trace((w**2).sum(), [w], samples=0)
    nan = LF.hessian_max_eigenvalue((w**2).sum() * NAN, [w])
    assert not math.isfinite(float(nan))  # a NaN loss gives a visibly NaN eigenvalue, never a finite one


# --- more found by attacking the API ---------------------------------------------------------------------------


def test_finite_differences_leave_batchnorm_statistics_as_one_pass_would():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train()
    x = torch.randn(16, 3)
    reference = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1)).train()
    reference.load_state_dict(model.state_dict())
    reference(x)  # one ordinary training pass
    data_gradient_penalty_fd(_per_sample(model), x, model)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, b_ref), name
    model.load_state_dict(reference.state_dict())
    reference(x)
    parameter_gradient_penalty_fd(lambda: model(x).square().mean(), model)
    for (name, b), b_ref in zip(model.named_buffers(), reference.buffers(), strict=True):
        assert torch.equal(b, b_ref), name


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool, torch.complex64])
def test_norms_refuse_non_floating_tensors(dtype):
    t = torch.ones(2, 3).to(dtype)
    with pytest.raises(TypeError, match=rf"`t` must be floating point, got dtype {dtype}.*t\.float\(\)"):
        per_sample_norm(t)
    with pytest.raises(TypeError, match=r"`t` must be floating point"):
        per_sample_squared_norm(t)


def test_one_sided_must_be_a_bool():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(TypeError, match=r"`one_sided` must be True or False, got str 'no'"):
        gradient_norm_penalty(x, center=1.0, one_sided="no")
    with pytest.raises(TypeError, match=r"`one_sided` must be True or False, got int 1"):
        data_gradient_penalty(x.sum(1), x, one_sided=1)


def test_critic_errors_name_the_critic():
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match=r"`critic` must be a callable.*got Tensor"):
        wgan_gradient_penalty(real, real, fake)
    with pytest.raises(TypeError, match=r"`critic` must return a tensor of per-sample scores, got tuple"):
        r1_penalty(lambda t: (t.sum(1),), real)
    with pytest.raises(ValueError, match=r"`critic\(real\)` must hold one value per sample.*got shape \(\)"):
        r1_penalty(lambda t: t.sum(), real)
    with pytest.raises(ValueError, match=r"`critic\(fake\)` must hold one value per sample.*\(4, 3\)"):
        r2_penalty(lambda t: t * 2, fake)
    with pytest.raises(ValueError, match=r"`critic\(x_hat\)` must hold one value per sample"):
        wgan_gradient_penalty(lambda t: t, real, fake)
    with pytest.raises(TypeError, match=r"`fn` must be a callable mapping a batch to per-sample values, got Parameter"):
        data_gradient_penalty_fd(nn.Linear(3, 1).weight, real, nn.Linear(3, 1))
    with pytest.raises(TypeError, match=r"`loss_fn` must be a callable"):
        parameter_gradient_penalty_fd(torch.zeros(()), nn.Linear(3, 1))


def test_output_gradient_bad_loss_fn():
    lin = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`loss_fn\(\)` must return a scalar, got \(4, 2\).*reduction='sum'"):
        output_gradient(lambda: lin(x), lin)
    with pytest.raises(TypeError, match=r"`loss_fn` must be a callable taking no argument"):
        per_sample_output_gradient_norms(lin(x), lin)


@pytest.mark.parametrize("shape", [(0, 3), (3, 0), (0, 2, 3, 3)])
def test_spectral_norm_of_empty_weights_is_zero(shape):
    sigma, u = spectral_norm(torch.zeros(shape))
    assert float(sigma) == 0.0 and u.shape == (shape[0],)


# --- generated models against independent computations -------------------------------------------------------


def _random_mlp(seed, d, hidden, act, dtype, dropout=0.0):
    torch.manual_seed(seed)
    return _mlp(d=d, hidden=hidden, act=act, dtype=dtype, dropout=dropout)


@FEW
@given(
    seed=st.integers(0, 2**16), batch=st.integers(1, 5), d=st.integers(1, 4), hidden=st.integers(1, 6),
    act=st.sampled_from([nn.Tanh, nn.Softplus, nn.ReLU]), power=st.sampled_from([1, 2, 3]),
    center=st.sampled_from([0.0, 1.0]), dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_data_penalty_matches_torch_func_on_generated_models(seed, batch, d, hidden, act, power, center, dtype):
    model = _random_mlp(seed, d, hidden, act, dtype)
    x = torch.randn(batch, d, dtype=dtype)
    expected = _torch_func_data_penalty(model, x, power, center)
    xg = x.clone().requires_grad_()
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(data_gradient_penalty(_per_sample(model)(xg), xg, power=power, center=center),
                               expected, rtol=tol, atol=tol)


@FEW
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), d=st.integers(1, 4), hidden=st.integers(1, 6),
       act=st.sampled_from([nn.Tanh, nn.Softplus]))
def test_parameter_penalty_matches_torch_func_on_generated_models(seed, batch, d, hidden, act):
    model = _random_mlp(seed, d, hidden, act, torch.float64)
    x, y = torch.randn(batch, d, dtype=torch.float64), torch.randn(batch, 1, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    g = grad(lambda p: F.mse_loss(functional_call(model, p, (x,)), y))(params)
    expected = sum(t.square().sum() for t in g.values())
    torch.testing.assert_close(parameter_gradient_penalty(F.mse_loss(model(x), y), model), expected)
    res = parameter_gradient_penalty_fd(lambda: F.mse_loss(model(x), y), model)
    torch.testing.assert_close(res.penalty, expected)


@FEW
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5), center=st.sampled_from([0.0, 1.0, 2.5]))
def test_difference_penalty_matches_a_loop(seed, batch, center):
    model = _random_mlp(seed, 3, 5, nn.Tanh, torch.float64)
    real, fake = torch.randn(batch, 3, dtype=torch.float64), torch.randn(batch, 3, dtype=torch.float64)
    a1, a2 = torch.rand(batch, dtype=torch.float64), torch.rand(batch, dtype=torch.float64)
    terms = []
    for i in range(batch):
        x1 = a1[i] * real[i] + (1 - a1[i]) * fake[i]
        x2 = a2[i] * real[i] + (1 - a2[i]) * fake[i]
        dist = float((x1 - x2).norm())
        if dist > 1e-12:
            with torch.no_grad():
                slope = abs(float(model(x1[None])[0, 0] - model(x2[None])[0, 0])) / dist
            terms.append((slope - center) ** 2)
    out = difference_penalty(_per_sample(model), real, fake, alpha=(a1, a2), center=center)
    assert math.isclose(float(out), sum(terms) / len(terms) if terms else 0.0, rel_tol=1e-9, abs_tol=1e-12)


@FEW
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 6), p=st.sampled_from([0.0, 0.2, 0.5]),
       power=st.sampled_from([1, 2]), center=st.sampled_from([0.0, 1.0]))
def test_finite_difference_matches_double_backward_with_the_same_masks(seed, batch, p, power, center):
    model = _random_mlp(seed, 4, 16, nn.Tanh, torch.float64, dropout=p).train()
    x = torch.randn(batch, 4, dtype=torch.float64)
    torch.manual_seed(seed + 1)
    xg = x.clone().requires_grad_()
    exact = data_gradient_penalty(_per_sample(model)(xg), xg, power=power, center=center)
    exact_grads = torch.autograd.grad(exact, list(model.parameters()), materialize_grads=True)
    torch.manual_seed(seed + 1)
    res = data_gradient_penalty_fd(_per_sample(model), x, model, power=power, center=center, step=1e-6)
    torch.testing.assert_close(res.penalty, exact.detach())
    scale = max(float(torch.cat([g.reshape(-1) for g in exact_grads]).norm()), 1e-6)
    for a, b in zip(res.grads, exact_grads, strict=True):
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_penalty_and_attack_in_every_dtype_against_float64(dtype):
    torch.manual_seed(6)
    ref = _mlp(d=4, hidden=8, dtype=torch.float64)
    model = _mlp(d=4, hidden=8).to(dtype)
    model.load_state_dict(ref.state_dict())
    real, fake = torch.rand(5, 4, dtype=torch.float64), torch.rand(5, 4, dtype=torch.float64)
    alpha = torch.rand(5, dtype=torch.float64)
    tol = {torch.float16: 3e-2, torch.bfloat16: 1e-1}.get(dtype, 1e-5)

    def both(f):
        low, high = f(model, real.to(dtype), fake.to(dtype)), f(ref, real, fake)
        assert low.dtype == dtype, f
        torch.testing.assert_close(low.detach().double(), high.detach(), rtol=tol, atol=tol)

    both(lambda m, r, f: wgan_gradient_penalty(_per_sample(m), r, f, alpha=alpha))
    both(lambda m, r, f: wgan_gradient_penalty_fd(_per_sample(m), r, f, m, alpha=alpha).penalty)
    both(lambda m, r, f: r1_penalty(_per_sample(m), r))
    both(lambda m, r, f: r2_penalty(_per_sample(m), f))
    both(lambda m, r, f: difference_penalty(_per_sample(m), r, f, alpha=(alpha, alpha.flip(0))))
    both(lambda m, r, f: parameter_gradient_penalty(m(r).square().mean(), m))
    both(lambda m, r, f: parameter_gradient_penalty_fd(lambda: m(r).square().mean(), m).penalty)
    both(lambda m, r, f: per_sample_output_gradient_norms(lambda: m(r).sum(), m[0]))
    for norm in ("l2", "linf"):
        adv = fgsm(_per_sample(model), real.to(dtype), epsilon=0.1, norm=norm, clamp=(0, 1))
        assert adv.dtype == dtype and not _nonfinite(adv)
        delta = (adv.double() - real)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert bool((size <= 0.1 + 2 * tol).all())
        adv = pgd(_per_sample(model), real.to(dtype), epsilon=0.1, norm=norm, steps=2, step_size=0.05, clamp=(0, 1))
        assert adv.dtype == dtype and not _nonfinite(adv)


def _tensor_arguments():
    """(argument name, call(value)) for every tensor argument of the functional API."""
    model, clf = _mlp(), nn.Linear(3, 2)
    x, y = torch.rand(4, 3), torch.randint(0, 2, (4,))
    xg = x.clone().requires_grad_()
    fn = _per_sample(model)
    return [
        ("t", lambda v: per_sample_norm(v)),
        ("t", lambda v: per_sample_squared_norm(v)),
        ("t", lambda v: gradient_norm_penalty(v)),  # `grad` in the dtype error (the name of the argument)
        ("output", lambda v: input_gradient(v, xg)),
        ("inputs", lambda v: input_gradient(fn(xg), v)),
        ("output", lambda v: data_gradient_penalty(v, xg)),
        ("inputs", lambda v: data_gradient_penalty(fn(xg), v)),
        ("inputs", lambda v: data_gradient_penalty_fd(fn, v, model)),
        ("loss", lambda v: parameter_gradient_penalty(v, model)),
        ("real", lambda v: interpolate(v, x)),
        ("fake", lambda v: interpolate(x, v)),
        ("real", lambda v: wgan_gradient_penalty(fn, v, x)),
        ("fake", lambda v: wgan_gradient_penalty_fd(fn, x, v, model)),
        ("real", lambda v: r1_penalty(fn, v)),
        ("fake", lambda v: r2_penalty(fn, v)),
        ("real", lambda v: difference_penalty(fn, v, x)),
        ("inputs", lambda v: fgsm(_ce(clf, y), v, epsilon=0.1)),
        ("inputs", lambda v: pgd(_ce(clf, y), v, epsilon=0.1, steps=1, step_size=0.1)),
        ("weight", lambda v: spectral_norm(v)),
        ("inputs", lambda v: mlp_inequality(model, v, lambda out: out[:, 0])),
    ]


@FEW
@given(bad=st.one_of(st.none(), st.floats(allow_nan=True), st.text(max_size=3), st.lists(st.floats(), max_size=3),
                     st.booleans()))
def test_every_tensor_argument_refuses_non_tensors_by_name(bad):
    for arg, call in _tensor_arguments():
        with pytest.raises(TypeError, match=rf"`{arg}` must be a torch.Tensor, got {type(bad).__name__}"):
            call(bad)


@pytest.mark.parametrize("dtype", [torch.long, torch.bool])
def test_every_tensor_argument_refuses_integer_tensors_by_name(dtype):
    bad = torch.ones(4, 3, dtype=dtype)
    for arg, call in _tensor_arguments():
        if arg in ("output", "loss"):  # per-sample values / losses: checked for their graph, not their dtype
            continue
        if call.__code__.co_names[:1] == ("gradient_norm_penalty",):
            arg = "grad"
        with pytest.raises(TypeError, match=rf"`{arg}` must be floating point.*{dtype}"):
            call(bad)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(n=st.integers(0, 6), classes=st.integers(1, 5), eps=st.sampled_from([0.05, 0.0, -1.0, NAN, INF, 3]),
       attacks=st.sampled_from([["pgd-20"], ["apgd-ce"], ["pgd-20", "apgd-ce"], "fast", ["pgd20"], []]),
       lo=st.sampled_from([0.0, -1.0, 0.5]), seed=st.integers(0, 2**16))
def test_robust_accuracy_gives_robust_below_clean_or_a_clear_error(n, classes, eps, attacks, lo, seed):
    """Hostile settings: a boolean per sample, never robust where misclassified, or an error naming the argument."""
    pytest.importorskip("torchattacks")
    torch.manual_seed(seed)
    model = nn.Linear(4, classes)
    x, y = torch.rand(n, 4), torch.randint(0, max(classes, 1), (n,))
    try:
        robust = LF.robust_accuracy(model, x, y, eps, attacks=attacks, bounds=(lo, 1.0))
    except ValueError as err:
        assert re.search(r"`eps`|`attacks`|`bounds`|`x`|classes|'apgd-t'", str(err)), err
        return
    assert robust.dtype == torch.bool and robust.shape == (n,)
    assert not bool((robust & (model(x).argmax(1) != y)).any())
    # the outcomes behind it: the same per-sample answer; robust after each attack only shrinks, clean on top
    out = LF.robust_outcomes(model, x, y, eps, attacks=attacks, bounds=(lo, 1.0))
    assert torch.equal(out.robust, robust) and torch.equal(out.clean, model(x).argmax(1) == y)
    previous = out.clean
    for after in out.after.values():
        assert not bool((after & ~previous).any())
        previous = after
    assert torch.equal(previous, out.robust) and set(out.seconds) == set(out.after)


# --- the robust-training baselines (TRADES, GradAlign) ---------------------------------------------------------


def _classifier() -> nn.Module:
    """4 features → 3 classes, float64 (a one-output model would make every cross-entropy 0)."""
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), eps=st.sampled_from([0.1, 0.0, -0.1, NAN, INF]), steps=st.sampled_from([1, 3, 0, -2]),
       norm=st.sampled_from(["linf", "l2", "l1"]), bounds=st.sampled_from([(0.0, 1.0), None, (1.0, 0.0)]),
       seed=st.integers(0, 2**16))
def test_trades_adversarial_stays_in_the_ball_and_box_or_names_the_argument(n, eps, steps, norm, bounds, seed):
    """x' within ε of x (in the norm) and inside the box, more KL than x itself; or an error naming the argument."""
    torch.manual_seed(seed)
    model = _classifier().eval()
    x = torch.rand(n, 4, dtype=torch.float64)
    try:
        x_adv = LF.trades_adversarial(model, x, eps, norm=norm, steps=steps, bounds=bounds)
    except (ValueError, TypeError) as err:
        assert re.search(r"`eps`|`steps`|`norm`|clamp|bounds", str(err)), err
        return
    dist = (x_adv - x).abs().flatten(1).amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert bool((dist <= eps + 1e-12).all())
    if bounds is not None:
        assert float(x_adv.min()) >= bounds[0] and float(x_adv.max()) <= bounds[1]
    assert float(LF.trades_kl(model(x), model(x_adv))) >= 0


@FEW
@given(b=st.integers(1, 5), c=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_trades_kl_is_the_batch_mean_of_the_categorical_kl(b, c, seed):
    g = torch.Generator().manual_seed(seed)
    p, q = torch.randn(b, c, generator=g, dtype=torch.float64), torch.randn(b, c, generator=g, dtype=torch.float64)
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                             torch.distributions.Categorical(logits=q)).mean()
    torch.testing.assert_close(LF.trades_kl(p, q), want, atol=1e-12, rtol=0)
    assert float(LF.trades_kl(p, p)) == 0.0


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), eps=st.sampled_from([0.05, 0.0, -1.0, NAN]), beta=st.sampled_from([6.0, 0.0, -1.0]),
       mode=st.sampled_from(["eval", "train", "test"]), seed=st.integers(0, 2**16))
def test_trades_loss_is_the_clean_loss_plus_a_nonnegative_kl_or_names_the_argument(n, eps, beta, mode, seed):
    torch.manual_seed(seed)
    model = _classifier()
    x, y = torch.rand(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    try:
        loss = LF.trades_loss(model, x, y, eps, beta, steps=2, attack_mode=mode)
    except (ValueError, TypeError) as err:
        assert re.search(r"`eps`|`beta`|`attack_mode`", str(err)), err
        return
    assert float(loss) >= float(F.cross_entropy(model(x), y)) - 1e-12 and model.training


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), eps=st.sampled_from([0.1, 0.0, -0.1, NAN]), seed=st.integers(0, 2**16))
def test_grad_align_penalty_lies_in_zero_two_or_names_eps(n, eps, seed):
    torch.manual_seed(seed)
    model = _classifier()
    x, y = torch.rand(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    try:
        penalty = LF.grad_align_penalty(lambda u: F.cross_entropy(model(u), y), x, eps)
    except (ValueError, TypeError) as err:
        assert "`eps`" in str(err), err
        return
    assert -1e-12 <= float(penalty) <= 2 + 1e-12
    if eps == 0:  # η = 0: the two gradients are the same (or both zero: nothing misaligned)
        assert abs(float(penalty)) < 1e-12


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 6), eps=st.sampled_from([0.05, 0.0, -1.0, NAN]), beta=st.sampled_from([6.0, 0.0, -1.0]),
       mode=st.sampled_from(["eval", "train", "test"]), seed=st.integers(0, 2**16))
def test_mart_loss_is_its_two_terms_or_names_the_argument(n, eps, beta, mode, seed):
    """The boosted CE of x' is above its CE (the margin term is positive), the weighted KL nonnegative; the loss is the
    sum; bad settings name the argument."""
    torch.manual_seed(seed)
    model = _classifier()
    x, y = torch.rand(n, 4, dtype=torch.float64), torch.randint(0, 3, (n,))
    gen = torch.Generator().manual_seed(seed)
    try:
        loss = LF.mart_loss(model, x, y, eps, beta, steps=2, attack_mode=mode, generator=gen)
    except (ValueError, TypeError) as err:
        assert re.search(r"`eps`|`beta`|`attack_mode`", str(err)), err
        return
    x_adv = LF.mart_adversarial(model.eval(), x, y, eps, steps=2, generator=torch.Generator().manual_seed(seed))
    model.train()
    boosted, kl = LF.mart_terms(model(x), model(x_adv), y)
    assert float(boosted) > float(F.cross_entropy(model(x_adv), y)) and float(kl) >= -1e-9
    torch.testing.assert_close(loss, boosted + beta * kl, atol=1e-12, rtol=0)
    assert float(LF.mart_terms(model(x), model(x), y)[1]) < 1e-9  # x' = x: no KL


@FEW
@given(shapes=st.lists(st.sampled_from([(3, 4), (5,), (2, 2, 3), (1, 1)]), min_size=1, max_size=4),
       gamma=st.sampled_from([0.0, 5e-3, 1.0, -1.0, NAN]), zero=st.booleans(), seed=st.integers(0, 2**16))
def test_awp_perturbation_has_norm_gamma_times_the_weight_along_the_gradient(shapes, gamma, zero, seed):
    """‖v_l‖ = γ‖W_l‖ along g_l for each tensor; a zero gradient gives no move (never NaN); a bad γ names `gamma`."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    grads = [torch.zeros(s, dtype=torch.float64) if zero else torch.randn(s, generator=g, dtype=torch.float64)
             for s in shapes]
    try:
        moves = LF.awp_perturbation(params, grads, gamma)
    except (ValueError, TypeError) as err:
        assert "`gamma`" in str(err), err
        return
    for p, d, v in zip(params, grads, moves, strict=True):
        assert v.shape == p.shape and bool(torch.isfinite(v).all())
        want = 0.0 if zero else gamma * float(p.norm())
        assert math.isclose(float(v.norm()), want, rel_tol=1e-9, abs_tol=1e-12)
        if not zero and gamma > 0:
            assert float(F.cosine_similarity(v.flatten(), d.flatten(), dim=0)) > 1 - 1e-12


def test_awp_parameters_are_the_authors_weights_or_the_choice():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    named = list(net.named_parameters())
    assert [n for n, p in named if any(p is q for q in LF.awp_parameters(named))] == ["0.weight", "3.weight"]
    assert len(LF.awp_parameters(named, "all")) == len(named)
    assert LF.awp_parameters(named, lambda n, p: n.startswith("3.")) == [net[3].weight, net[3].bias]
    net[3].weight.requires_grad_(False)  # frozen: not moved
    assert LF.awp_parameters(net.named_parameters()) == [net[0].weight]
    with pytest.raises(ValueError, match="`params`"):
        LF.awp_parameters(named, "biases")
