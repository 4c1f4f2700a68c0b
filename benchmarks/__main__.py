"""Run every benchmark and print their tables: ``python -m benchmarks [--quick]``.

Each module is also runnable on its own (``python -m benchmarks.bench_functional``). The peers' benchmarks
need the ``bench`` extra and run on their own: ``python -m benchmarks.bench_peers``, ``benchmarks.bench_attacks``.
"""

from __future__ import annotations

import importlib
import sys

import torch

MODULES = ["bench_functional", "bench_callbacks", "bench_wgan", "bench_grad_norms", "bench_monitors", "bench_targets"]


def main() -> None:
    args = sys.argv[1:]
    threads = torch.get_num_threads()
    for name in MODULES:
        print(f"\n## benchmarks.{name}\n", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        torch.set_num_threads(threads)  # a module that sets its own count (bench_wgan: 1) must not leak it
        module.main(args)


if __name__ == "__main__":
    main()
