"""Step time of each penalty of :mod:`lightning_gp.functional` as a ratio to a plain training step.

A "step" is forward, backward, optimizer update and zero_grad on an MLP 64→512→512→10 with batch 256 (the
issue's reference setting). The optimizer is SGD by default, the strictest baseline (the cheapest update,
so the penalty's passes weigh most); ``--optimizer adam`` times the same steps with Adam, whose update is a
fixed cost that every row pays once. Every variant is timed round-robin in the same process, so machine noise
hits all alike; medians of repeated runs, warm-up excluded.

Run::

    python -m benchmarks.bench_functional            # CPU, and CUDA when present
    python -m benchmarks.bench_functional --quick    # fewer repeats
    python -m benchmarks.bench_functional --optimizer adam

Why finite differences cannot reach 2× here: each of its two passes is a full forward and backward
(the first also takes ∇ₓ, which the plain step skips for the first layer). Counting multiply-adds of the
three Linear layers (forward 1 unit, input gradient 1, weight gradient 1, per weight), a plain step costs
3·300k − 33k and the finite-difference step 6·300k − 33k: a ratio of 2.04 before any overhead, with SGD.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.harness import Row, devices, format_table, interleaved_medians
from lightning_gp.functional import (
    data_gradient_penalty,
    data_gradient_penalty_fd,
    fgsm,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
    wgan_gradient_penalty,
)

# Targets of issue 2 (CPU): the two data-penalty rows.
TARGETS = {"data penalty, double backprop": 2.3, "data penalty, finite difference": 1.9}


def mlp(out: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, out))


OPTIMIZERS = {"sgd": lambda params: torch.optim.SGD(params, lr=1e-3),
              "adam": lambda params: torch.optim.Adam(params, lr=1e-3)}


def build_steps(
    device: torch.device, batch: int = 256, optimizer: str = "sgd", model: nn.Module | None = None
) -> dict[str, callable]:
    """The timed steps, by row name; ``model`` (default: a fresh seeded MLP) is the one they train."""
    torch.manual_seed(0)
    model = mlp().to(device) if model is None else model
    params = list(model.parameters())
    opt = OPTIMIZERS[optimizer](params)
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    weight = 0.1

    def per_sample(inp):
        return F.cross_entropy(model(inp), y, reduction="none")

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def plain():
        F.cross_entropy(model(x), y).backward()
        update()

    def data_double_backprop():
        xr = x.detach().requires_grad_(True)
        losses = per_sample(xr)
        (losses.mean() + weight * data_gradient_penalty(losses, xr)).backward()
        update()

    def data_finite_difference():
        res = data_gradient_penalty_fd(per_sample, x, params)
        for p, g0, g1 in zip(params, res.output_grads, res.grads, strict=True):
            p.grad = torch.add(g0, g1, alpha=weight)
        update()

    def param_double_backprop():
        loss = F.cross_entropy(model(x), y)
        (loss + weight * parameter_gradient_penalty(loss, params)).backward()
        update()

    def param_finite_difference():
        res = parameter_gradient_penalty_fd(lambda: F.cross_entropy(model(x), y), params)
        for p, g0, g1 in zip(params, res.output_grads, res.grads, strict=True):
            p.grad = torch.add(g0, g1, alpha=weight)
        update()

    def fgsm_step():
        x_adv = fgsm(per_sample, x, epsilon=0.1, norm="linf")
        F.cross_entropy(model(x_adv), y).backward()
        update()

    critic = mlp(out=1).to(device)
    critic_opt = OPTIMIZERS[optimizer](list(critic.parameters()))
    fake = torch.randn(batch, 64, device=device)

    def critic_plain():
        (critic(fake).mean() - critic(x).mean()).backward()
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)

    def critic_gp():
        loss = critic(fake).mean() - critic(x).mean() + 10 * wgan_gradient_penalty(critic, x, fake)
        loss.backward()
        critic_opt.step()
        critic_opt.zero_grad(set_to_none=True)

    return {
        "plain step": plain,
        "data penalty, double backprop": data_double_backprop,
        "data penalty, finite difference": data_finite_difference,
        "parameter penalty, double backprop": param_double_backprop,
        "parameter penalty, finite difference": param_finite_difference,
        "FGSM adversarial (l∞)": fgsm_step,
        "WGAN critic step, no penalty": critic_plain,
        "WGAN-GP critic step": critic_gp,
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd", help="update of every step")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (10, 3) if args.quick else (40, 8)
    tables = []
    for device in devices():
        steps = build_steps(device, optimizer=args.optimizer)
        times = interleaved_medians(steps, device=device, warmup=warmup, repeats=repeats)
        base = times["plain step"]
        rows = [
            Row(name, t, base, TARGETS.get(name) if device.type == "cpu" else None)
            for name, t in times.items()
        ]
        # The critic rows are also worth reading against the unregularized critic step.
        gp = times["WGAN-GP critic step"] / times["WGAN critic step, no penalty"]
        title = (f"{device.type.upper()} ({torch.get_num_threads()} threads): MLP 64→512→512→10, batch 256, "
                 f"{args.optimizer.upper() if args.optimizer == 'sgd' else 'Adam'}")
        tables.append(format_table(title, rows) + f"\n\nWGAN-GP critic step / unregularized critic step: {gp:.2f}×")
    out = "\n\n".join(tables)
    print(out)
    return out


if __name__ == "__main__":
    main()
