"""Cost of the per-sample gradient norms and of the MLP inequality, against a plain training step.

MLP 64→512→512→10, batch 256 (the issue's reference setting). ``per_sample_grad_norms`` (ghost norms:
one forward, one backward to the layer outputs, no per-sample gradient built) is compared with the
usual exact alternative, ``torch.func`` vmap of grad over the parameters followed by the norms; the
target is ≥ 20× faster. ``mlp_inequality`` is reported per call (exact Jacobian norms, since the input
has 64 ≤ 256 features), for the whole batch and for the 32 samples a monitor would typically use.
Round-robin medians in one process, warm-up excluded.

Run::

    python -m benchmarks.bench_grad_norms            # CPU, and CUDA when present
    python -m benchmarks.bench_grad_norms --quick    # fewer repeats
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from benchmarks.harness import Row, devices, format_table, interleaved_medians, median_time
from lightning_gp.functional.grad_norms import per_sample_grad_norms
from lightning_gp.functional.mlp_inequality import mlp_inequality

SPEEDUP_TARGET = 20.0  # per_sample_grad_norms vs torch.func vmap, CPU


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def build(device: torch.device, batch: int = 256) -> tuple[dict[str, callable], dict[str, callable]]:
    torch.manual_seed(0)
    model = mlp().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    def per_sample_loss(out: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="none")

    def plain() -> None:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ghost() -> None:
        per_sample_grad_norms(model, x, per_sample_loss)

    def loss_one(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    per_sample_grads = vmap(grad(loss_one, argnums=(0, 1)), in_dims=(None, 0, 0))

    def torch_func() -> None:
        params = {k: p.detach() for k, p in model.named_parameters()}
        dp, dx = per_sample_grads(params, x, y)
        sum(g.reshape(batch, -1).square().sum(1) for g in dp.values()).sqrt()
        dx.norm(dim=1)

    def inequality(samples: int):
        return lambda: mlp_inequality(model, x, per_sample_loss, max_samples=samples)

    fast = {"plain step": plain, "per_sample_grad_norms": ghost, "torch.func vmap per-sample grads": torch_func}
    slow = {f"mlp_inequality, {n} samples": inequality(n) for n in (32, batch)}
    return fast, slow


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats, warmup = (8, 2) if args.quick else (30, 5)
    tables = []
    for device in devices():
        fast, slow = build(device)
        times = interleaved_medians(fast, device=device, warmup=warmup, repeats=repeats)
        for name, fn in slow.items():
            times[name] = median_time(fn, device=device, warmup=1, repeats=max(3, repeats // 4))
        base = times["plain step"]
        rows = [Row(name, t, base) for name, t in times.items()]
        speedup = times["torch.func vmap per-sample grads"] / times["per_sample_grad_norms"]
        target = f" (target ≥ {SPEEDUP_TARGET:.0f}×: {'met' if speedup >= SPEEDUP_TARGET else 'NOT met'})"
        title = f"{device.type.upper()} ({torch.get_num_threads()} threads): MLP 64→512→512→10, batch 256"
        tables.append(
            format_table(title, rows)
            + f"\n\nper_sample_grad_norms vs torch.func vmap: {speedup:.1f}× faster"
            + (target if device.type == "cpu" else "")
        )
    out = "\n\n".join(tables)
    print(out)
    return out


if __name__ == "__main__":
    main()
