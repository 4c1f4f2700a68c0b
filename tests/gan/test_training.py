"""WGAN-GP mixin in training: constraints (clipping, spectral norm), checkpoint/resume mid-cycle,
bf16-mixed, torch.compile with finite differences, and real 2-process DDP against one process."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.utils.data import DataLoader

from tests.ddp import run_ddp_script
from tests.ddp_scripts.wgan_models import IndexedGAN, TinyGAN, indexed_loader, mlp, trainer_kwargs


def _data(n=40, dim=2):
    return torch.randn(n, dim) * 0.7 + 0.5


def _fit(model, data, batch_size=8, ckpt_path=None, **kwargs):
    trainer = L.Trainer(**trainer_kwargs(**kwargs))
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=False), ckpt_path=ckpt_path)
    return trainer


def test_weight_clipping_keeps_every_critic_weight_within_clip_value():
    model = TinyGAN(regularizer="weight_clipping", clip_value=0.05, lr=0.1, n_critic=2)
    trainer = _fit(model, _data(), max_epochs=1)
    values = torch.cat([p.detach().flatten() for p in model.critic.parameters()])
    assert values.abs().max() <= 0.05
    assert (values.abs() == 0.05).float().mean() > 0.5  # lr 0.1 pushes most weights onto the box
    assert "wgan/penalty" not in trainer.callback_metrics


class _ConvGAN(TinyGAN):
    def __init__(self, **kwargs):
        critic = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(64, 1))
        generator = nn.Sequential(nn.Linear(3, 16), nn.Unflatten(1, (1, 4, 4)))
        super().__init__(critic=critic, generator=generator, **kwargs)


def test_spectral_normalization_uses_pytorch_parametrization_on_every_layer():
    model = _ConvGAN(regularizer="spectral_normalization", lr=1e-2, n_critic=2)
    trainer = _fit(model, torch.randn(64, 1, 4, 4), max_epochs=1)
    layers = [m for m in model.critic.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(layers) == 2
    for layer in layers:
        assert parametrize.is_parametrized(layer, "weight")
        assert any(isinstance(p, _SpectralNorm) for p in layer.parametrizations.weight)
    # The normalized Linear weight has spectral norm ≈ 1 (power iteration runs once per forward).
    model.eval()
    sigma = torch.linalg.matrix_norm(model.critic[3].weight.detach(), ord=2)
    assert float(sigma) == pytest.approx(1.0, abs=0.05)
    # The optimizer trains the parametrization's `original`, the same tensors the critic holds.
    critic_opt = trainer.optimizers[1]
    held = {id(p) for g in critic_opt.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.critic.parameters()}


def test_resume_mid_cycle_is_bit_identical(tmp_path):
    data = _data(40)  # 5 batches per epoch, n_critic 3: epoch 1 ends mid-cycle (5 % 3 = 2)
    torch.manual_seed(7)
    straight = TinyGAN(n_critic=3, lr=1e-2)
    t1 = _fit(straight, data, max_epochs=3)

    torch.manual_seed(7)
    first = TinyGAN(n_critic=3, lr=1e-2)
    t2 = _fit(first, data, max_epochs=1)
    assert (first.critic_steps, first.generator_steps, t2.global_step) == (5, 1, 6)
    ckpt = tmp_path / "mid_cycle.ckpt"
    t2.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert saved["hyper_parameters"]["n_critic"] == 3

    torch.manual_seed(99)  # another init and another global seed: everything must come from the checkpoint
    resumed = TinyGAN(n_critic=3, lr=1e-2)
    t3 = _fit(resumed, data, max_epochs=3, ckpt_path=ckpt)
    assert (resumed.critic_steps, resumed.generator_steps) == (straight.critic_steps, straight.generator_steps)
    assert (resumed.critic_steps, resumed.generator_steps) == (15, 5)
    assert t3.global_step == t1.global_step == 20
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_bf16_mixed(method):
    model = TinyGAN(n_critic=2, method=method, lr=1e-3)
    trainer = _fit(model, _data(32), max_epochs=1, precision="bf16-mixed")
    assert model.critic_steps == 4 and model.generator_steps == 2
    m = trainer.callback_metrics
    for key in ("critic_loss", "generator_loss", "wasserstein_estimate", "penalty", "critic_grad_norm"):
        assert torch.isfinite(m[f"wgan/{key}"]), key
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())  # mixed: weights stay float32


def test_compiled_critic_needs_finite_differences():
    torch.manual_seed(3)
    critic = mlp(2, 1, hidden=16)
    compiled = torch.compile(critic, backend="aot_eager")
    with pytest.raises(RuntimeError, match="double backward"):
        _fit(TinyGAN(critic=compiled, n_critic=2), _data(16), max_steps=1)

    model = TinyGAN(critic=compiled, n_critic=2, method="finite_difference", lr=1e-2)
    before = [p.detach().clone() for p in critic.parameters()]
    trainer = _fit(model, _data(32), max_epochs=1)
    assert model.critic_steps == 4 and model.generator_steps == 2
    # every weight trains; the last bias has gradient exactly 0 (it cancels in D(fake) − D(real), and ∇ₓD does not
    # see it), which the finite difference reproduces exactly: (∇L(x + h·d) − ∇L(x))/h = (1 − 1)/h for it
    weights = [(a, p) for a, p in zip(before, critic.parameters(), strict=True) if p.ndim > 1]
    assert all(not torch.equal(a, p) for a, p in weights)
    assert torch.equal(before[-1], list(critic.parameters())[-1])
    assert torch.isfinite(trainer.callback_metrics["wgan/penalty"])
    assert float(trainer.callback_metrics["wgan/critic_grad_norm"]) > 0


@pytest.mark.ddp
@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_ddp_matches_one_process_on_the_combined_batch(tmp_path, method):
    res = run_ddp_script("wgan_ddp.py", tmp_path / f"wgan_ddp_{method}.pt", "--method", method)
    ranks = res["ranks"]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for r in ranks:
        assert (r["critic_steps"], r["generator_steps"], r["global_step"]) == (6, 3, 9)
        # One accumulation per parameter per backward pass (6 critic + 3 generator): the penalty's
        # autograd.grad calls fired no accumulate-grad (DDP) hook, and every parameter took part in
        # every backward (the 0·θ trick), so no bucket was left pending.
        assert set(r["accumulations"].values()) == {9}
    for key, a in ranks[0]["params"].items():  # generator and critic identical across ranks
        assert torch.equal(a, ranks[1]["params"][key]), key

    # One process on the combined batches (8 = 2 × 4 samples the ranks saw), from the same init and
    # with the same per-sample z and α.
    order = [int(i) for k in range(6) for r in ranks for i in r["seen"][k]]
    assert sorted(order) == list(range(48))
    L.seed_everything(0)
    single = IndexedGAN(n_critic=2, lr=1e-2, method=method).double()
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(ranks[0]["init"][key], value), key
    trainer = L.Trainer(max_epochs=1, devices=1, **trainer_kwargs())
    trainer.fit(single, indexed_loader(batch_size=8, order=order))
    assert (single.critic_steps, single.generator_steps) == (6, 3)
    for key, value in single.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-5, atol=1e-5)
            if not key.endswith("critic.2.bias"):  # a WGAN critic's last bias gets no gradient
                assert not torch.equal(ranks[0]["init"][key], value), key
    # every logged value describes both ranks' samples: what one process logs on the combined batch (each rank
    # logged its own before, 17 % off), on every rank
    single_logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("wgan/")}
    assert len(single_logged) == 5
    # the finite difference's step comes from each rank's own samples: the runs part at 1e-5 (the parameters above)
    rel = 1e-6 if method == "double_backward" else 1e-4
    for r in ranks:
        assert {k: v for k, v in r["metrics"].items() if k.startswith("wgan/")} == pytest.approx(single_logged, rel=rel)
