"""The robust-training baselines as their papers' authors wrote their training steps, for the tests to compare with.

Written from the papers and the authors' published steps (yaodongyu/TRADES ``trades_loss``), in their style: a
``KLDivLoss``-style sum over the batch divided by B, the clean logits recomputed for the KL's target, the model in
eval mode while x' is found. Nothing here calls lightning_gp. The random start comes from a generator the caller
passes (the authors draw from the global stream; the callbacks from their documented per-step generator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def trades_x_adv(model: nn.Module, x: Tensor, eps: float, step_size: float, steps: int, gen: torch.Generator,
                 logits_of: Callable[[Tensor], Tensor] | None = None, bounds: tuple[float, float] | None = (0.0, 1.0)
                 ) -> Tensor:
    """TRADES' l∞ inner maximisation, the model in eval mode (the caller's ``model.eval()``)."""
    logits_of = logits_of or model
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(logits_of(x_adv), dim=1), F.softmax(logits_of(x), dim=1),
                               reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
        if bounds is not None:
            x_adv = torch.clamp(x_adv, *bounds)
    return x_adv if bounds is None else torch.clamp(x_adv, *bounds)


def trades_step_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float, step_size: float, steps: int,
                     gen: torch.Generator) -> Tensor:
    """The authors' ``trades_loss``: eval-mode x', then CE(model(x)) + β·KL_sum(model(x') ‖ model(x))/B in train mode,
    the passes in their order (x, x', x)."""
    model.eval()
    x_adv = trades_x_adv(model, x, eps, step_size, steps, gen)
    model.train()
    logits = model(x)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / len(x)) * F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1),
                                            reduction="sum")
    return loss_natural + beta * loss_robust


def grad_align_fgsm_step_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, lam: float,
                              gen: torch.Generator) -> Tensor:
    """The authors' FGSM + GradAlign step (``--attack fgsm --attack_init zero``): the FGSM gradient at x (detached),
    δ = ε·sign(g) clipped into [0, 1]; the loss at x + δ; the gradient at x + η, η ~ U[−ε, ε] unclipped, with its
    graph; λ·(1 − mean cos) over the samples whose two gradients are nonzero."""
    delta = torch.zeros_like(x, requires_grad=True)
    loss = F.cross_entropy(model(torch.clamp(x + delta, 0, 1)), y)
    grad = torch.autograd.grad(loss, delta)[0].detach()
    delta = torch.clamp(eps * torch.sign(grad), -eps, eps)
    delta = torch.clamp(x + delta, 0, 1) - x
    loss = F.cross_entropy(model(x + delta.detach()), y)
    noise = torch.zeros_like(x).uniform_(-eps, eps, generator=gen).requires_grad_(True)
    grad2 = torch.autograd.grad(F.cross_entropy(model(x + noise), y), noise, create_graph=True)[0]
    nnz = (grad.flatten(1).norm(dim=1) != 0) & (grad2.flatten(1).norm(dim=1) != 0)
    g1, g2 = grad[nnz], grad2[nnz]
    g1 = g1 / g1.flatten(1).norm(dim=1).reshape(-1, *([1] * (g1.ndim - 1)))
    g2 = g2 / g2.flatten(1).norm(dim=1).reshape(-1, *([1] * (g2.ndim - 1)))
    cos = (g1 * g2).flatten(1).sum(1)
    return loss + lam * (1.0 - cos.mean())


def mart_step_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, beta: float, step_size: float, steps: int,
                   gen: torch.Generator) -> Tensor:
    """The authors' ``mart_loss``: eval-mode CE-PGD from x + 0.001·N(0, I); then in train mode the logits of x and of
    x' (in that order); the boosted CE of x' (CE + NLL of log(1.0001 − p' + 1e-12) at the most probable wrong class)
    plus β·(1/B)·Σ KL(p ‖ p')·(1.0000001 − p_y), KL with log(p' + 1e-12)."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn(x.shape, generator=gen, dtype=x.dtype)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.clamp(torch.min(torch.max(x_adv, x - eps), x + eps), 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    logits = model(x)
    logits_adv = model(x_adv)
    adv_probs = F.softmax(logits_adv, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(logits, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1).long()).squeeze()
    kl = (nat_probs * (torch.log(nat_probs) - torch.log(adv_probs + 1e-12))).sum(dim=1)
    loss_robust = (1.0 / len(x)) * torch.sum(kl * (1.0000001 - true_probs))
    return loss_adv + float(beta) * loss_robust


def awp_diff(model: nn.Module, objective: Callable[[nn.Module], Tensor], proxy_lr: float = 0.01) -> dict[str, Tensor]:
    """The authors' ``calc_awp``: a proxy copy of the model takes one SGD step on −objective; per weight of dimension
    > 1, diff = ‖W‖/(‖W_proxy − W‖ + 1e-20)·(W_proxy − W)."""
    import copy

    proxy = copy.deepcopy(model)
    proxy.train()
    proxy_opt = torch.optim.SGD(proxy.parameters(), lr=proxy_lr)
    loss = -objective(proxy)
    proxy_opt.zero_grad()
    loss.backward()
    proxy_opt.step()
    diff = {}
    for (name, old), (_, new) in zip(model.state_dict().items(), proxy.state_dict().items(), strict=True):
        if old.ndim > 1 and "weight" in name:
            diff[name] = old.norm() / ((new - old).norm() + 1e-20) * (new - old)
    return diff


def add_into_weights(model: nn.Module, diff: dict[str, Tensor], coeff: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in diff:
                param.add_(coeff * diff[name])
