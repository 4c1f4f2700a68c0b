"""lightning-gp's AutoAttack against the official one (fra31/auto-attack), side by side on the same model and samples.

The model: a small CNN on scikit-learn's 8×8 digits (conv 1→16, conv 16→32 stride 2, linear), trained with PGD-7
(l∞, ε = 0.1) for a few epochs, so that robust accuracy is neither 0 nor clean accuracy. The samples: 500 held-out
digits. Each norm (l∞ ε = 0.1, l2 ε = 0.5) is evaluated by ``AutoAttack(model, norm, eps, version="standard",
seed=0).run_standard_evaluation(x, y, bs=500)`` and by ``robust_outcomes(model, x, y, eps, attacks="standard",
seed=0, batch_size=500)``, one after the other in this process, each timed once (wall clock). Reported: robust
accuracy of each, the per-sample agreement (the fraction of samples on which both say robust, or both not), the
cumulative accuracy after each attack, and the time ratio (ours ÷ official).

The official code is not a dependency: install it for this comparison only, without its dependencies::

    pip install --no-deps git+https://github.com/fra31/auto-attack

Run::

    python -m benchmarks.bench_autoattack                  # about 10 minutes on 2 CPU threads
    python -m benchmarks.bench_autoattack --samples 100 --norms linf
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional import pgd
from lightning_gp.functional.robust import robust_outcomes

EPS = {"linf": 0.1, "l2": 0.5}


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x.reshape(-1, 1, 8, 8))


def digits(samples: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from examples._digits import digits_tensors

    x_tr, y_tr, x_te, y_te = digits_tensors(test_size=samples)
    return x_tr.view(-1, 1, 8, 8), y_tr, x_te.view(-1, 1, 8, 8), y_te


def train(x: Tensor, y: Tensor, epochs: int, seed: int = 0) -> DigitsCNN:
    """PGD-7 adversarial training (l∞, ε = 0.1, step 0.025, random start), Adam, batch 64."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            xb, yb = x[order[i:i + 64]], y[order[i:i + 64]]
            model.eval()
            adv = pgd(lambda u, yb=yb: F.cross_entropy(model(u), yb, reduction="sum"), xb, epsilon=0.1, norm="linf",
                      steps=7, step_size=0.025, clamp=(0.0, 1.0))
            model.train()
            loss = F.cross_entropy(model(adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def official(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float) -> tuple[Tensor, dict, float]:
    """Per-sample robustness by fra31/auto-attack's standard version, its cumulative accuracies and its time."""
    from autoattack import AutoAttack

    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        adversary = AutoAttack(model, norm={"linf": "Linf", "l2": "L2"}[norm], eps=eps, version="standard", seed=0,
                               device="cpu", verbose=True)
        start = time.perf_counter()
        _, labels = adversary.run_standard_evaluation(x, y, bs=len(x), return_labels=True)
    elapsed = time.perf_counter() - start
    after, seconds, previous = {}, {}, 0.0
    for line in log.getvalue().splitlines():  # "robust accuracy after APGD-CE: 62.40% (total time 3.1 s)"
        if line.startswith("robust accuracy after"):
            name = line.split("after ")[1].split(":")[0].lower()
            after[name] = float(line.split(": ")[1].split("%")[0]) / 100
            total = float(line.split("total time ")[1].split(" s")[0])
            seconds[name], previous = total - previous, total
    return labels == y, after, seconds, elapsed


def ours(model: nn.Module, x: Tensor, y: Tensor, norm: str, eps: float) -> tuple[Tensor, dict, float]:
    start = time.perf_counter()
    out = robust_outcomes(model, x, y, eps, norm=norm, attacks="standard", seed=0, batch_size=len(x))  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    return out.robust, {k: float(v.float().mean()) for k, v in out.after.items()}, out.seconds, elapsed


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--norms", nargs="+", choices=list(EPS), default=list(EPS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x_tr, y_tr, x, y = digits(args.samples)
    model = train(x_tr, y_tr, args.epochs)
    clean = float((model(x).argmax(1) == y).float().mean())
    lines = [f"Digits CNN (PGD-7 l∞ 0.1 training, {args.epochs} epochs), {len(x)} held-out samples, clean accuracy "
             f"{clean:.1%}, CPU {torch.get_num_threads()} threads",
             "", "| norm, ε | robust acc. official | ours | per-sample agreement | after each attack: official / ours "
             "(time) | time official | ours | ours ÷ official |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for norm in args.norms:
        eps = EPS[norm]
        # the order alternates between norms, so that neither side always runs first
        first, second = (official, ours) if norm == args.norms[0] else (ours, official)
        runs = {first: first(model, x, y, norm, eps), second: second(model, x, y, norm, eps)}
        (ref, ref_after, ref_s, ref_t), (got, got_after, got_s, got_t) = runs[official], runs[ours]
        agree = float((ref == got).float().mean())
        steps = ", ".join(f"{k} {ref_after.get(k, float('nan')):.1%} / {got_after[k]:.1%} "
                          f"({ref_s.get(k, float('nan')):.1f} s / {got_s[k]:.1f} s)" for k in got_after)
        lines.append(f"| {norm}, {eps:g} | {ref.float().mean():.1%} | {got.float().mean():.1%} | {agree:.1%} | {steps} "
                     f"| {ref_t:.1f} s | {got_t:.1f} s | {got_t / ref_t:.2f} |")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
