"""Each callback (and combinations) against a hand-written PyTorch loop with the same math, float64."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    ParameterGradientPenalty,
    SpectralNormPenalty,
)

STEPS, BATCH, LR = 3, 8, 0.1


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    n = STEPS * BATCH
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


def make_net() -> torch.nn.Module:
    gen = torch.Generator().manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    return net


class Module(pl.LightningModule):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def lightning_run(callbacks, batch_size: int = BATCH, **kwargs) -> dict[str, torch.Tensor]:
    model = Module(make_net())
    trainer = pl.Trainer(max_steps=STEPS, precision="64-true", callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(model, DataLoader(dataset(), batch_size=batch_size))
    return {k.removeprefix("net."): v for k, v in model.state_dict().items()}


# ---- hand-written math (plain torch, independent of lightning_gp) ----------------------------------------

def ce(net, x, y):
    return F.cross_entropy(net(x), y)


def per_sample_input_grad(net, x, y, create_graph):
    x = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(net(x), y, reduction="sum"), x, create_graph=create_graph)
    return x, g


def data_penalty_obj(net, x, y, w, power=2, center=0.0, one_sided=False):
    xl, g = per_sample_input_grad(net, x, y, create_graph=True)
    norm = g.square().sum(1).sqrt()
    gap = (norm - center).clamp_min(0) if one_sided else (norm - center)
    return F.cross_entropy(net(xl), y) + w * gap.abs().pow(power).mean()


def param_penalty_obj(net, x, y, w):
    loss = ce(net, x, y)
    g = torch.autograd.grad(loss, list(net.parameters()), create_graph=True)
    return loss + w * sum(t.square().sum() for t in g)


def data_fd_grads(net, x, y, w, step=1e-2):
    params = list(net.parameters())
    _, g = per_sample_input_grad(net, x, y, create_graph=False)
    d = 2 * g  # ∂‖g‖²/∂g
    h = step * x.square().sum(1).mean().sqrt() / d.square().sum(1).sqrt().max()
    base = torch.autograd.grad(ce(net, x, y), params)
    second = torch.autograd.grad(ce(net, x + h * d, y), params)
    return [b + w * (s - b) / h for b, s in zip(base, second, strict=True)]


def param_fd_grads(net, x, y, w, step=1e-3):
    params = list(net.parameters())
    g = torch.autograd.grad(ce(net, x, y), params)
    gn = torch.sqrt(sum(t.square().sum() for t in g))
    h = step * torch.sqrt(sum(p.detach().square().sum() for p in params)) / gn
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for p, t in zip(moved.parameters(), g, strict=True):
            p.add_(h * t)
    g2 = torch.autograd.grad(ce(moved, x, y), list(moved.parameters()))
    return [a + 2 * w * (b - a) / h for a, b in zip(g, g2, strict=True)]


def combined_fd_grads(net, x, y):
    params = list(net.parameters())
    base = torch.autograd.grad(ce(net, x, y), params)
    data, param = data_fd_grads(net, x, y, 0.5), param_fd_grads(net, x, y, 0.2)
    spectral = torch.autograd.grad(0.05 * SPECTRAL.penalty(net), params, allow_unused=True)
    adversarial = torch.autograd.grad(0.5 * ce(net, fgsm_l2(net, x, y, 0.3), y) - 0.5 * ce(net, x, y), params)
    return [d + p - b + (0 if s is None else s) + a
            for d, p, b, s, a in zip(data, param, base, spectral, adversarial, strict=True)]


class PowerIteration:
    def __init__(self):
        self.u = {}

    def penalty(self, net):
        total = 0
        for name, layer in net.named_modules():
            if not isinstance(layer, torch.nn.Linear):
                continue
            w = layer.weight
            cold = name not in self.u
            if cold:
                gen = torch.Generator().manual_seed(0)
                u = F.normalize(torch.randn(w.shape[0], generator=gen, dtype=w.dtype), dim=0)
            else:
                u = self.u[name]
            with torch.no_grad():
                for _ in range(30 if cold else 1):
                    v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
                    u = F.normalize(w @ v, dim=0, eps=1e-12)
            self.u[name] = u
            total = total + torch.dot(u, w @ v) ** 2
        return total


def fgsm_l2(net, x, y, eps):
    _, g = per_sample_input_grad(net, x, y, create_graph=False)
    return x + eps * g / g.square().sum(1, keepdim=True).sqrt()


def pgd_linf(net, x, y, eps, steps):
    delta = torch.zeros_like(x)
    for _ in range(steps):
        _, g = per_sample_input_grad(net, x + delta, y, create_graph=False)
        delta = (delta + 2.5 * eps / steps * g.sign()).clamp(-eps, eps)
    return x + delta


def hand_run(grads_fn) -> dict[str, torch.Tensor]:
    net = make_net()
    ds = dataset()
    for t in range(STEPS):
        x, y = ds.tensors[0][t * BATCH:(t + 1) * BATCH], ds.tensors[1][t * BATCH:(t + 1) * BATCH]
        out = grads_fn(net, x, y, t)
        grads = torch.autograd.grad(out, list(net.parameters())) if isinstance(out, torch.Tensor) else out
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= LR * g
    return net.state_dict()


SPECTRAL = PowerIteration()

CASES = {
    "data_double_backward": (
        lambda: [DataGradientPenalty(0.5)], lambda n, x, y, t: data_penalty_obj(n, x, y, 0.5)),
    "data_one_sided_center": (
        lambda: [DataGradientPenalty(0.5, power=2, center=1.0, one_sided=True)],
        lambda n, x, y, t: data_penalty_obj(n, x, y, 0.5, center=1.0, one_sided=True)),
    "data_power1": (
        lambda: [DataGradientPenalty(0.3, power=1)], lambda n, x, y, t: data_penalty_obj(n, x, y, 0.3, power=1)),
    "data_finite_difference": (
        lambda: [DataGradientPenalty(0.5, method="finite_difference")],
        lambda n, x, y, t: data_fd_grads(n, x, y, 0.5)),
    "data_lazy": (
        lambda: [DataGradientPenalty(0.5, every_n_steps=2)],
        lambda n, x, y, t: data_penalty_obj(n, x, y, 1.0) if t % 2 == 0 else ce(n, x, y)),
    "parameter_double_backward": (
        lambda: [ParameterGradientPenalty(0.2)], lambda n, x, y, t: param_penalty_obj(n, x, y, 0.2)),
    "parameter_finite_difference": (
        lambda: [ParameterGradientPenalty(0.2, method="finite_difference")],
        lambda n, x, y, t: param_fd_grads(n, x, y, 0.2)),
    "spectral": (lambda: [SpectralNormPenalty(0.05)], lambda n, x, y, t: ce(n, x, y) + 0.05 * SPECTRAL.penalty(n)),
    "adversarial_fgsm_l2": (
        lambda: [AdversarialTraining(0.3, adversarial_weight=0.5)],
        lambda n, x, y, t: 0.5 * ce(n, x, y) + 0.5 * ce(n, fgsm_l2(n, x, y, 0.3), y)),
    "adversarial_pgd_linf": (
        lambda: [AdversarialTraining(0.1, norm="linf", steps=3)],
        lambda n, x, y, t: ce(n, pgd_linf(n, x, y, 0.1, 3), y)),
    "combined_penalties": (
        # list order does not matter: the callbacks nest in a fixed order, each on the raw loss
        lambda: [SpectralNormPenalty(0.05), ParameterGradientPenalty(0.2), DataGradientPenalty(0.5)],
        lambda n, x, y, t: data_penalty_obj(n, x, y, 0.5) + param_penalty_obj(n, x, y, 0.2) - ce(n, x, y)
        + 0.05 * SPECTRAL.penalty(n)),
    "combined_finite_differences": (
        # both finite differences share one backward of the loss (it is linearised once), then adversarial
        # training (a < 1) subtracts the linearised clean loss: the sum of the separate hand-written gradients
        lambda: [SpectralNormPenalty(0.05), ParameterGradientPenalty(0.2, method="finite_difference"),
                 DataGradientPenalty(0.5, method="finite_difference"),
                 AdversarialTraining(0.3, adversarial_weight=0.5)],
        lambda n, x, y, t: combined_fd_grads(n, x, y)),
    "combined_adversarial_data": (
        lambda: [DataGradientPenalty(0.5), AdversarialTraining(0.3)],
        lambda n, x, y, t: data_penalty_obj(n, fgsm_l2(n, x, y, 0.3), y, 0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hand_written_loop(case):
    callbacks, hand = CASES[case]
    SPECTRAL.u.clear()
    expected = hand_run(hand)
    got = lightning_run(callbacks())
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=f"{case}: {key}")
    assert max((got[k] - make_net().state_dict()[k]).abs().max() for k in got) > 1e-3  # it trained


def test_accumulation_and_clipping_match_hand_written_loop():
    """accumulate_grad_batches=2 (Lightning divides each micro-batch loss by 2) and norm clipping."""
    half = BATCH // 2
    got = lightning_run([DataGradientPenalty(0.5), ParameterGradientPenalty(0.2)], batch_size=half,
                        accumulate_grad_batches=2, gradient_clip_val=0.05)
    net, ds = make_net(), dataset()
    for t in range(STEPS):  # STEPS optimizer steps of 2 micro-batches: one epoch
        grads = [torch.zeros_like(p) for p in net.parameters()]
        for m in range(2):
            i = 2 * t + m
            x, y = ds.tensors[0][i * half:(i + 1) * half], ds.tensors[1][i * half:(i + 1) * half]
            obj = data_penalty_obj(net, x, y, 0.5) + param_penalty_obj(net, x, y, 0.2) - ce(net, x, y)
            for acc, g in zip(grads, torch.autograd.grad(obj / 2, list(net.parameters())), strict=True):
                acc += g
        total = torch.sqrt(sum(g.square().sum() for g in grads))
        scale = min(1.0, 0.05 / (float(total) + 1e-6))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= LR * g * scale
    for key, value in net.state_dict().items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
