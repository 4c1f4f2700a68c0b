"""``lightning_gp.functional.fgsm`` against ``torchattacks.FGSM`` on the same CNN and batch, interleaved.

CNN of ``benchmarks.bench_peers`` (2 conv + 2 linear) on (128, 3, 32, 32) images in [0, 1], ε = 8/255, l∞.
torchattacks' conventions are matched: the model in eval mode (it has no dropout or BatchNorm, so eval and
train compute the same), cross-entropy loss, x + ε·sign(∇ₓℓ) clamped to (0, 1). Ours:
``fgsm(per-sample cross-entropy, x, epsilon=ε, norm="linf", clamp=(0, 1))``. The two results must be bitwise
equal. Method as in ``bench_peers``: interleaved rounds in shuffled order (plain step, ours, torchattacks),
median of per-round ratios with the IQR. Target (issue 13): ours ÷ torchattacks ≤ 1.0.

Run::

    python -m benchmarks.bench_attacks              # 2 threads
    python -m benchmarks.bench_attacks --quick
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from benchmarks.bench_peers import cnn
from benchmarks.harness import interleaved_rounds, load_note, ratio_stats
from lightning_gp.functional import fgsm

TARGET = 1.0
EPS = 8 / 255


def build(batch: int = 128, width: int = 32) -> dict[str, object]:
    torch.manual_seed(0)
    model = cnn(width).eval()
    x, y = torch.rand(batch, 3, 32, 32), torch.randint(0, 10, (batch,))

    def plain():
        F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    def ours():
        return fgsm(lambda inp: F.cross_entropy(model(inp), y, reduction="none"), x, epsilon=EPS, norm="linf",
                    clamp=(0, 1))

    import torchattacks

    attack = torchattacks.FGSM(model, eps=EPS)
    return {"plain": plain, "lightning_gp fgsm": ours, "torchattacks.FGSM": lambda: attack(x, y)}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (noisier)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds (default 30; --quick 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--tiny", action="store_true", help="batch 8, narrow CNN (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.repeats or (8 if args.quick else 30)
    fns = build(8, 4) if args.tiny else build()
    equal = torch.equal(fns["lightning_gp fgsm"](), fns["torchattacks.FGSM"]())
    min_ms = 1.0 if args.tiny else 40.0 if args.quick else 100.0  # one timing: a few calls, not one
    times = interleaved_rounds(fns, rounds=rounds, min_ms=min_ms, rng=random.Random(0))
    lines = [
        f"### CPU ({torch.get_num_threads()} threads): FGSM (l∞, ε = 8/255) on the CNN, batch "
        f"{8 if args.tiny else 128}, {rounds} interleaved rounds",
        "",
        "| step | × plain (median) | IQR | × torchattacks (median) | IQR | target | met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for name in ("lightning_gp fgsm", "torchattacks.FGSM"):
        med, lo, hi = ratio_stats([t / p for t, p in zip(times[name], times["plain"], strict=True)])
        rel, rlo, rhi = ratio_stats([t / r for t, r in zip(times[name], times["torchattacks.FGSM"], strict=True)])
        ours = name.startswith("lightning")
        target = f"≤ {TARGET:.2f}×" if ours else ""
        met = ("yes" if rel <= TARGET else "**no**") if ours else ""
        lines.append(f"| {name} | {med:.2f} | {lo:.2f}–{hi:.2f} | {rel:.3f} | {rlo:.3f}–{rhi:.3f} | {target} | {met} |")
    after = load_note(torch.get_num_threads())
    lines += ["", f"Bitwise equal to torchattacks.FGSM: {'yes' if equal else '**NO**'}. After: {after}."]
    out = "\n".join(lines)
    print(out)
    return out


if __name__ == "__main__":
    main()
