"""WGAN-GP mixin: the critic step against hand-written WGAN-GP, the regularizers against the functional
layer, the n_critic schedule and global_step, and the configuration errors."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_gp.functional.gan import difference_penalty, r1_penalty, r2_penalty, wgan_gradient_penalty
from lightning_gp.gan.mixin import WGANGPMixin
from lightning_gp.gan.regularizers import REGULARIZERS
from tests.ddp_scripts.wgan_models import SGDGAN, TinyGAN, mlp, trainer_kwargs

LAMBDA = 10.0


def _real(n=32, dim=2, dtype=torch.float64):
    return torch.randn(n, dim, dtype=dtype) * 0.7 + 0.5


def _fit(model, data, batch_size=8, **kwargs):
    trainer = L.Trainer(**trainer_kwargs(**kwargs))
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=False))
    return trainer


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _hand_critic_grads(critic, generator, real, z, alphas, regularizer, weight):
    """One hand-written critic loss E[D(G(z))] − E[D(x)] + λ·R and its gradient (source document 004)."""
    fake = generator(z).detach()
    loss = critic(fake).mean() - critic(real).mean()
    if regularizer == "gp_hand":  # fully written out, nothing from lightning_gp
        a = alphas[0].reshape(-1, 1)
        x_hat = (a * real + (1 - a) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat, create_graph=True)
        loss = loss + weight * ((g.norm(dim=1) - 1) ** 2).mean()
    elif regularizer in ("gp", "gp_one_sided"):
        pen = wgan_gradient_penalty(critic, real, fake, alpha=alphas[0], one_sided=regularizer != "gp")
        loss = loss + weight * pen
    elif regularizer == "r1":
        loss = loss + weight * r1_penalty(critic, real)
    elif regularizer == "r2":
        loss = loss + weight * r2_penalty(critic, fake)
    elif regularizer == "difference":
        loss = loss + weight * difference_penalty(critic, real, fake, alpha=(alphas[0], alphas[1]))
    return torch.autograd.grad(loss, list(critic.parameters()))


def _drawn(model, kind):
    return [t for k, t in model.drawn if k == kind]


@pytest.mark.parametrize("regularizer", ["gp", "gp_one_sided", "r1", "r2", "difference", "none"])
def test_critic_step_equals_hand_written_step(regularizer):
    torch.manual_seed(1)
    model = SGDGAN(regularizer=regularizer, gp_weight=LAMBDA, n_critic=5).double()
    # Make the penalty's regime non-trivial: ‖∇D‖ well away from 1 for the one-sided variant too.
    with torch.no_grad():
        model.critic[0].weight.mul_(3.0)
    critic0, generator0 = copy.deepcopy(model.critic), copy.deepcopy(model.generator)
    before = _params(model.critic)
    real = _real()
    trainer = _fit(model, real, max_steps=1)
    assert model.critic_steps == 1 and model.generator_steps == 0 and trainer.global_step == 1

    (z,) = _drawn(model, "z")
    alphas = _drawn(model, "alpha")
    if regularizer == "none":
        assert alphas == []
    else:
        assert len(alphas) == 2 and alphas[0].shape == (8,)  # one α per sample
    expected = _hand_critic_grads(critic0, generator0, real[:8], z, alphas, regularizer, LAMBDA)
    got = [b - a for b, a in zip(before, _params(model.critic), strict=True)]  # SGD lr 1: Δθ = −∇
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)

    if regularizer == "gp":  # the document's formula, written out by hand, gives the same step
        written = _hand_critic_grads(critic0, generator0, real[:8], z, alphas, "gp_hand", LAMBDA)
        for g, e in zip(got, written, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-6)

    # Logged values: the penalty, ‖∇D‖ at its points, and the Wasserstein estimate.
    m = trainer.callback_metrics
    fake = generator0(z).detach()
    w = (critic0(real[:8]).mean() - critic0(fake).mean()).detach()
    assert float(m["wgan/wasserstein_estimate"]) == pytest.approx(float(w), rel=1e-5)
    if regularizer == "gp":
        a = alphas[0].reshape(-1, 1)
        x_hat = (a * real[:8] + (1 - a) * fake).requires_grad_(True)
        (g,) = torch.autograd.grad(critic0(x_hat).sum(), x_hat)
        pen = ((g.norm(dim=1) - 1) ** 2).mean()
        assert float(m["wgan/penalty"]) == pytest.approx(float(pen), rel=1e-5)
        assert float(m["wgan/critic_grad_norm"]) == pytest.approx(float(g.norm(dim=1).mean()), rel=1e-5)
        assert float(m["wgan/critic_loss"]) == pytest.approx(float(-w + LAMBDA * pen), rel=1e-5)
    if regularizer in ("difference", "none"):
        assert "wgan/critic_grad_norm" not in m  # no input gradient is taken
    assert ("wgan/penalty" in m) == (regularizer != "none")


def test_finite_difference_step_close_to_double_backward():
    torch.manual_seed(2)
    real = _real()
    steps = {}
    for method in ("double_backward", "finite_difference"):
        torch.manual_seed(3)
        model = SGDGAN(method=method, n_critic=5).double()
        with torch.no_grad():
            model.critic[0].weight.mul_(3.0)
        before = _params(model.critic)
        trainer = _fit(model, real, max_steps=1)
        steps[method] = torch.cat([(b - a).flatten() for b, a in zip(before, _params(model.critic), strict=True)])
        steps[method + "_norm"] = float(trainer.callback_metrics["wgan/critic_grad_norm"])
    cos = torch.nn.functional.cosine_similarity(steps["double_backward"], steps["finite_difference"], dim=0)
    assert cos > 0.999
    assert steps["double_backward_norm"] == pytest.approx(steps["finite_difference_norm"], rel=1e-9)


def test_lazy_regularization_every_k_steps_with_weight_times_k():
    torch.manual_seed(4)
    model = SGDGAN(reg_every=2, n_critic=5).double()
    critic, generator = copy.deepcopy(model.critic), copy.deepcopy(model.generator)
    real = _real(24)
    _fit(model, real, max_steps=3)
    zs, alphas = _drawn(model, "z"), _drawn(model, "alpha")
    assert len(zs) == 3 and len(alphas) == 4  # α drawn on steps 0 and 2 only
    with torch.no_grad():
        for step, (weight, a) in enumerate([(2 * LAMBDA, alphas[0:2]), (0.0, None), (2 * LAMBDA, alphas[2:4])]):
            with torch.enable_grad():
                reg = "gp" if weight else "none"
                grads = _hand_critic_grads(critic, generator, real[8 * step : 8 * step + 8], zs[step], a, reg, weight)
            for p, g in zip(critic.parameters(), grads, strict=True):
                p.sub_(g)
    for p, q in zip(model.critic.parameters(), critic.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)


def test_generator_steps_once_every_n_critic_batches_and_global_step():
    torch.manual_seed(5)

    class Snap(L.Callback):
        def __init__(self):
            self.changed = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.before = _params(module.generator)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after = _params(module.generator)
            self.changed.append(any(not torch.equal(a, b) for a, b in zip(self.before, after, strict=True)))

    snap = Snap()
    model = TinyGAN(n_critic=3, lr=1e-2)
    # 7 batches per epoch, 2 epochs: the cycle runs across the epoch boundary (counted in critic steps).
    trainer = _fit(model, _real(56, dtype=torch.float32), max_epochs=2, callbacks=[snap])
    assert snap.changed == [(i + 1) % 3 == 0 for i in range(14)]
    assert (model.critic_steps, model.generator_steps) == (14, 4)
    assert trainer.global_step == 14 + 14 // 3  # every optimizer.step() of both optimizers counts
    assert "wgan/generator_loss" in trainer.callback_metrics


def test_max_steps_counts_both_optimizers():
    model = TinyGAN(n_critic=5)
    trainer = _fit(model, _real(240, dtype=torch.float32), max_steps=12)
    assert (model.critic_steps, model.generator_steps, trainer.global_step) == (10, 2, 12)


def test_hyperparameters_saved_and_user_save_hyperparameters_keeps_them():
    class Mine(TinyGAN):
        def __init__(self, width=4, **kwargs):
            super().__init__(**kwargs)
            self.save_hyperparameters()

    model = Mine(width=7, n_critic=3)
    assert model.hparams["width"] == 7 and model.hparams["n_critic"] == 3
    _fit(model, _real(16, dtype=torch.float32), max_steps=1)
    for key, value in dict(n_critic=3, regularizer="gp", gp_weight=10.0, clip_value=0.01, reg_every=1,
                           lr=1e-4, betas=(0.0, 0.9), method="double_backward").items():
        assert model.hparams[key] == value and model.hparams_initial[key] == value
    assert TinyGAN(regularizer="r1").hparams["regularizer"] == "r1"


def test_critic_with_batchnorm_raises_at_setup_naming_the_layer():
    critic = nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    model = TinyGAN(critic=critic)
    with pytest.raises(ValueError, match=r"layer '1' is BatchNorm1d.*LayerNorm or nn\.InstanceNorm"):
        _fit(model, _real(16, dtype=torch.float32), max_steps=1)


def test_errors_for_bad_configuration():
    with pytest.raises(ValueError, match=r"`n_critic` must be an integer >= 1, got 0"):
        TinyGAN(n_critic=0)
    listed = r"\[" + ", ".join(f"'{r}'" for r in REGULARIZERS) + r"\], got 'wgan'"
    with pytest.raises(ValueError, match=r"`regularizer` must be one of " + listed):
        TinyGAN(regularizer="wgan")
    with pytest.raises(ValueError, match=r"`method` must be one of \['double_backward', 'finite_difference'\]"):
        TinyGAN(method="fd")
    with pytest.raises(ValueError, match=r"`reg_every` must be an integer >= 1, got 0"):
        TinyGAN(reg_every=0)
    with pytest.raises(ValueError, match=r"`betas` must be two numbers in \[0, 1\)"):
        TinyGAN(betas=(0.5,))


def test_the_mixin_after_lightning_module_in_the_bases_is_refused_with_the_order_to_use():
    with pytest.raises(TypeError, match=r"Backwards: put WGANGPMixin before LightningModule .*"
                                        r"class Backwards\(WGANGPMixin, L.LightningModule\)"):
        class Backwards(L.LightningModule, WGANGPMixin):
            pass

    class Forwards(WGANGPMixin, L.LightningModule):  # the documented order, and subclasses of it, are accepted
        pass

    class Sub(Forwards):
        pass

    assert issubclass(Sub, WGANGPMixin)


def test_errors_for_bad_user_code():
    data = _real(16, dtype=torch.float32)

    class NoLatent(WGANGPMixin, L.LightningModule):
        def __init__(self):
            super().__init__()
            self.generator, self.critic = mlp(3, 2), mlp(2, 1)

    with pytest.raises(NotImplementedError, match=r"NoLatent must define `sample_latent\(self, n\)`"):
        _fit(NoLatent(), data, max_steps=1)

    class WrongCount(TinyGAN):
        def sample_latent(self, n):
            return torch.randn(n - 1, 3)

    with pytest.raises(ValueError, match=r"`sample_latent\(8\)` must return 8 latent vectors.*got \(7, 3\)"):
        _fit(WrongCount(), data, max_steps=1)

    with pytest.raises(ValueError, match=r"generator's output has shape \(8, 3\) but the real samples have "
                                         r"shape \(8, 2\)"):
        _fit(TinyGAN(generator=mlp(3, 3)), data, max_steps=1)

    class NoCritic(TinyGAN):
        def __init__(self):
            super().__init__()
            del self.critic

    with pytest.raises(AttributeError, match=r"must set `self.critic` to an nn.Module"):
        _fit(NoCritic(), data, max_steps=1)

    class Swapped(TinyGAN):
        def configure_optimizers(self):
            return torch.optim.SGD(self.critic.parameters(), lr=0.1), torch.optim.SGD(self.generator.parameters())

    with pytest.raises(ValueError, match=r"holds none of the critic's parameters.*\(generator_opt, critic_opt\)"):
        _fit(Swapped(), data, max_steps=1)
