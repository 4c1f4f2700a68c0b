"""Bad input fails at the call, with a message that names the argument and shows the bad value."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gp.functional.adversarial import fgsm, pgd
from lightning_gp.functional.gan import (
    difference_penalty,
    interpolate,
    r1_penalty,
    r2_penalty,
    wgan_gradient_penalty,
    wgan_gradient_penalty_fd,
)
from lightning_gp.functional.gradients import input_gradient, per_sample_norm, per_sample_squared_norm
from lightning_gp.functional.penalties import (
    data_gradient_penalty,
    data_gradient_penalty_fd,
    gradient_norm_penalty,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
)
from lightning_gp.functional.spectral import spectral_norm, spectral_norm_penalty


def _model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def _loss_fn(model):
    return lambda inp: model(inp)[:, 0]


# --- integer inputs -------------------------------------------------------------------------------------


def test_integer_inputs_raise_type_error_naming_dtype():
    model = _model()
    ints = torch.randint(0, 5, (4, 3))
    msg = r"`inputs` must be floating point .* got dtype torch\.int64"
    with pytest.raises(TypeError, match=msg):
        input_gradient(torch.zeros(4, requires_grad=True), ints)
    with pytest.raises(TypeError, match=msg):
        fgsm(_loss_fn(model), ints, epsilon=0.1)
    with pytest.raises(TypeError, match=msg):
        pgd(_loss_fn(model), ints, epsilon=0.1, steps=1, step_size=0.1)
    with pytest.raises(TypeError, match=msg):
        data_gradient_penalty_fd(model, ints, model)
    with pytest.raises(TypeError, match=r"`real` must be floating point .* got dtype torch\.int64"):
        wgan_gradient_penalty(model, ints, torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"`fake` must be floating point .* got dtype torch\.int32"):
        interpolate(torch.randn(4, 3), ints.int())
    with pytest.raises(TypeError, match=r"`real` must be floating point"):
        r1_penalty(model, ints)
    with pytest.raises(TypeError, match=r"`fake` must be floating point"):
        r2_penalty(model, ints)


def test_non_tensor_raises_type_error_naming_type():
    with pytest.raises(TypeError, match=r"`t` must be a torch\.Tensor, got list"):
        per_sample_norm([1.0, 2.0])
    with pytest.raises(TypeError, match=r"`output` must be a torch\.Tensor, got float"):
        input_gradient(1.0, torch.randn(2, 3, requires_grad=True))
    with pytest.raises(TypeError, match=r"`weight` must be a torch\.Tensor, got ndarray"):
        import numpy as np

        spectral_norm(np.eye(3))
    with pytest.raises(TypeError, match=r"`module` must be an nn\.Module, got Tensor"):
        spectral_norm_penalty(torch.eye(3))


# --- missing batch dimension ----------------------------------------------------------------------------


def test_zero_dim_tensors_raise_naming_argument_and_value():
    scalar = torch.tensor(2.5)
    with pytest.raises(ValueError, match=r"`t` must have a leading batch dimension, got a 0-d tensor \(tensor\(2\.5"):
        per_sample_norm(scalar)
    with pytest.raises(ValueError, match=r"`t` must have a leading batch dimension"):
        per_sample_squared_norm(scalar)
    with pytest.raises(ValueError, match=r"`t` must have a leading batch dimension"):
        gradient_norm_penalty(scalar)
    x0 = torch.tensor(1.0, requires_grad=True)
    with pytest.raises(ValueError, match=r"`inputs` must have a leading batch dimension.*tensor\(1\."):
        input_gradient(x0 * 2, x0)
    with pytest.raises(ValueError, match=r"`inputs` must have a leading batch dimension"):
        data_gradient_penalty(x0 * 2, x0)
    with pytest.raises(ValueError, match=r"`inputs` must have a leading batch dimension.*unsqueeze\(0\)"):
        fgsm(lambda i: i * 2, torch.tensor(0.3), epsilon=0.1)
    with pytest.raises(ValueError, match=r"`real` must have a leading batch dimension"):
        interpolate(torch.tensor(1.0), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"`alpha` must have a leading batch dimension"):
        interpolate(torch.ones(1, 2), torch.zeros(1, 2), alpha=torch.tensor(0.5))


# --- numbers out of range -------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [-0.1, float("nan"), True, "0.1"])
def test_bad_epsilon(eps):
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=re.escape(f"`epsilon` must be a non-negative number, got {eps!r}")):
        fgsm(_loss_fn(model), x, epsilon=eps)
    with pytest.raises(ValueError, match=re.escape(f"`epsilon` must be a non-negative number, got {eps!r}")):
        pgd(_loss_fn(model), x, epsilon=eps, steps=2, step_size=0.1)


def test_bad_steps_and_step_sizes():
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 1, got 0"):
        pgd(_loss_fn(model), x, epsilon=0.1, steps=0, step_size=0.1)
    with pytest.raises(ValueError, match=r"`steps` must be an integer >= 1, got 2\.0"):
        pgd(_loss_fn(model), x, epsilon=0.1, steps=2.0, step_size=0.1)
    with pytest.raises(ValueError, match=r"`step_size` must be a positive number, got 0"):
        pgd(_loss_fn(model), x, epsilon=0.1, steps=1, step_size=0)
    with pytest.raises(ValueError, match=r"`step_size` must be a non-negative number, got -1"):
        fgsm(_loss_fn(model), x, epsilon=0.1, step_size=-1)
    with pytest.raises(ValueError, match=r"`step` must be a positive number, got 0\.0"):
        data_gradient_penalty_fd(model, x, model, step=0.0)
    with pytest.raises(ValueError, match=r"`step` must be a positive number, got -0\.001"):
        parameter_gradient_penalty_fd(lambda: model(x).sum(), model, step=-1e-3)


@pytest.mark.parametrize("n_iter", [0, -3, 1.5])
def test_bad_n_iter(n_iter):
    with pytest.raises(ValueError, match=re.escape(f"`n_iter` must be an integer >= 1, got {n_iter!r}")):
        spectral_norm(torch.randn(3, 4), n_iter=n_iter)
    with pytest.raises(ValueError, match=re.escape(f"`n_iter` must be an integer >= 1, got {n_iter!r}")):
        spectral_norm_penalty(nn.Linear(3, 4), n_iter=n_iter)


@pytest.mark.parametrize("power", [0.5, 0, -1, "2"])
def test_bad_power(power):
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=re.escape(f"`power` must be a number >= 1, got {power!r}")):
        data_gradient_penalty(x.sum(1), x, power=power)
    with pytest.raises(ValueError, match=re.escape(f"`power` must be a number >= 1, got {power!r}")):
        gradient_norm_penalty(x, power=power)
    model = _model()
    with pytest.raises(ValueError, match=re.escape(f"`power` must be a number >= 1, got {power!r}")):
        data_gradient_penalty_fd(model, x.detach(), model, power=power)


def test_bad_center():
    x = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"`center` must be a non-negative number, got -1\.0"):
        data_gradient_penalty(x.sum(1), x, center=-1.0)
    with pytest.raises(ValueError, match=r"`center` must be a non-negative number, got -0\.5"):
        wgan_gradient_penalty(_model(), torch.randn(4, 3), torch.randn(4, 3), center=-0.5)


# --- choices --------------------------------------------------------------------------------------------


def test_unknown_norm():
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`norm` must be one of \['l2', 'linf'\], got 'l1'"):
        fgsm(_loss_fn(model), x, epsilon=0.1, norm="l1")
    with pytest.raises(ValueError, match=r"`norm` must be one of \['l2', 'linf'\], got 'Linf'"):
        pgd(_loss_fn(model), x, epsilon=0.1, norm="Linf", steps=1, step_size=0.1)


@pytest.mark.parametrize(("clamp", "msg"), [((1.0, 0.0), r"`clamp` must satisfy lo < hi, got \(1\.0, 0\.0\)"),
                                            ((0.5, 0.5), r"`clamp` must satisfy lo < hi, got \(0\.5, 0\.5\)"),
                                            (0.5, r"`clamp` must be a pair \(lo, hi\) or None, got 0\.5"),
                                            ((0, 1, 2), r"`clamp` must be a pair \(lo, hi\) or None, got \(0, 1, 2\)")])
def test_bad_clamp(clamp, msg):
    model = _model()
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match=msg):
        fgsm(_loss_fn(model), x, epsilon=0.1, clamp=clamp)
    with pytest.raises(ValueError, match=msg):
        pgd(_loss_fn(model), x, epsilon=0.1, steps=1, step_size=0.1, clamp=clamp)


# --- shapes ---------------------------------------------------------------------------------------------


def test_mismatched_real_fake_shapes():
    critic = _model()
    real, fake = torch.randn(4, 3), torch.randn(5, 3)
    msg = r"`real` and `fake` must have the same shape, got \(4, 3\) and \(5, 3\)"
    with pytest.raises(ValueError, match=msg):
        interpolate(real, fake)
    with pytest.raises(ValueError, match=msg):
        wgan_gradient_penalty(critic, real, fake)
    with pytest.raises(ValueError, match=msg):
        wgan_gradient_penalty_fd(critic, real, fake, critic)
    with pytest.raises(ValueError, match=msg):
        difference_penalty(critic, real, fake)
    with pytest.raises(ValueError, match=r"got \(4, 3\) and \(4, 3, 1\)"):
        interpolate(real, real[..., None])


@pytest.mark.parametrize("alpha_shape", [(3,), (5,), (4, 2), (1,)])
def test_alpha_with_wrong_number_of_elements(alpha_shape):
    real, fake = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    msg = re.escape(f"`alpha` must hold one value per sample (4), got shape {alpha_shape}")
    with pytest.raises(ValueError, match=msg):
        interpolate(real, fake, torch.rand(alpha_shape))
    with pytest.raises(ValueError, match=msg):
        wgan_gradient_penalty(lambda x: x.flatten(1).sum(1), real, fake, alpha=torch.rand(alpha_shape))
    with pytest.raises(ValueError, match=msg):
        difference_penalty(lambda x: x.flatten(1).sum(1), real, fake, alpha=(torch.rand(4), torch.rand(alpha_shape)))


def test_output_not_per_sample():
    x = torch.randn(4, 3, requires_grad=True)
    two = torch.cat([x, x], dim=1)[:, :2]
    with pytest.raises(ValueError, match=r"`output` must hold one value per sample, shape \(4,\) or \(4, 1\), "
                                         r"got shape \(4, 2\)"):
        data_gradient_penalty(two, x)
    with pytest.raises(ValueError, match=r"`output` must hold one value per sample.*got shape \(\)"):
        data_gradient_penalty(x.sum(), x)
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=r"`fn\(inputs\)` must hold one value per sample.*got shape \(4, 2\)"):
        data_gradient_penalty_fd(model, x.detach(), model)
    with pytest.raises(ValueError, match=r"`critic\(x\)` must hold one value per sample.*got shape \(8, 2\)"):
        difference_penalty(model, torch.randn(4, 3), torch.randn(4, 3))


def test_non_scalar_loss_where_scalar_needed():
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`loss` must be a scalar, got shape \(4, 1\)"):
        parameter_gradient_penalty(model(x), model)
    with pytest.raises(ValueError, match=r"`loss_fn\(\)` must be a scalar, got shape \(4,\)"):
        parameter_gradient_penalty_fd(lambda: model(x)[:, 0], model)


def test_bad_spectral_shapes():
    with pytest.raises(ValueError, match=r"`weight` must have at least 2 dimensions .* got shape \(5,\)"):
        spectral_norm(torch.randn(5))
    with pytest.raises(ValueError, match=r"`u` must have shape \(3,\) for this weight, got \(4,\)"):
        spectral_norm(torch.randn(3, 4), u=torch.randn(4))
    with pytest.raises(ValueError, match=r"`module` \(Tanh\) has no Linear, Conv or Bilinear layer"):
        spectral_norm_penalty(nn.Tanh())


# --- graphs that do not connect -------------------------------------------------------------------------


def test_inputs_not_requiring_grad():
    model = _model()
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`inputs` does not require grad.*requires_grad_\(\)"):
        data_gradient_penalty(model(x), x)
    with pytest.raises(ValueError, match=r"`inputs` does not require grad"):
        input_gradient(model(x), x)


def test_output_not_depending_on_inputs():
    model = _model()
    x = torch.randn(4, 3, requires_grad=True)
    other = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"`output` does not depend on `inputs`: autograd found no path"):
        input_gradient(model(other), x)  # has a graph (through the parameters), not through x
    with pytest.raises(ValueError, match=r"`output` does not depend on `inputs`: autograd found no path"):
        data_gradient_penalty(model(other)[:, 0], x)
    with pytest.raises(ValueError, match=r"`output` does not depend on `inputs` \(it has no autograd graph\)"):
        input_gradient(torch.zeros(4), x)
    with torch.no_grad():
        detached = model(x)
    with pytest.raises(ValueError, match=r"`output` does not depend on `inputs` \(it has no autograd graph\)"):
        input_gradient(detached, x)
    with pytest.raises(ValueError, match=r"`fn\(inputs\)` does not depend on `inputs`"):
        data_gradient_penalty_fd(lambda inp: model(other)[:, 0], x.detach(), model)
    with pytest.raises(ValueError, match=r"`loss_fn\(inputs\)` does not depend on `inputs`"):
        fgsm(lambda inp: model(other)[:, 0], x.detach(), epsilon=0.1)
    with pytest.raises(ValueError, match=r"`loss_fn\(inputs\)` must return a tensor computed from `inputs`"):
        fgsm(lambda inp: torch.zeros(4), x.detach(), epsilon=0.1)


def test_loss_not_depending_on_params():
    model = _model()
    w = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"`loss` does not depend on `params`: its gradient is None"):
        parameter_gradient_penalty((w**2).sum(), model)
    with pytest.raises(ValueError, match=r"`loss` does not depend on `params` \(it has no autograd graph\)"):
        parameter_gradient_penalty(torch.tensor(1.0), model)
    with pytest.raises(ValueError, match=r"`loss_fn\(\)` does not depend on `params`"):
        parameter_gradient_penalty_fd(lambda: (w**2).sum(), model)
    with pytest.raises(ValueError, match=r"`fn\(inputs\)` does not depend on `params`"):
        data_gradient_penalty_fd(lambda inp: (inp**2).sum(1), torch.randn(4, 3), model)


def test_bad_params():
    w = torch.randn(3)
    with pytest.raises(ValueError, match=r"`params\[0\]` \(shape \(3,\)\) does not require grad"):
        parameter_gradient_penalty((w**2).sum(), [w])
    with pytest.raises(ValueError, match=r"`params` holds no tensors that require grad"):
        parameter_gradient_penalty(torch.tensor(1.0, requires_grad=True), [])
    frozen = _model().requires_grad_(False)
    with pytest.raises(ValueError, match=r"`params` holds no tensors that require grad"):
        data_gradient_penalty_fd(frozen, torch.randn(4, 3), frozen)
    with pytest.raises(TypeError, match=r"`params\[1\]` must be a torch\.Tensor, got str"):
        parameter_gradient_penalty(torch.tensor(1.0, requires_grad=True), [torch.ones(1, requires_grad=True), "w"])


def test_cross_entropy_with_integer_labels_is_fine():
    # Integer *labels* are fine; only the differentiated inputs must be floating point.
    model = nn.Linear(3, 2)
    y = torch.tensor([0, 1, 1, 0])
    adv = fgsm(lambda i: F.cross_entropy(model(i), y, reduction="none"), torch.rand(4, 3), epsilon=0.1)
    assert adv.dtype == torch.float32
