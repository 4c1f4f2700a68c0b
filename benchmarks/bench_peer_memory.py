"""Peak memory of per-sample gradient norms ‖∇θℓᵢ‖ by lightning-gp and by its peers (Opacus, BackPACK, torch.func).

The routes and models of :mod:`benchmarks.bench_peers` (its ``linear-512``, ``hf-128`` and ``hf-512`` cases by
default: a Linear stack at T = 512, Hugging Face's BERT blocks, 4 layers × 256, at T = 128 and 512, B = 8).

Method. Each (model, route) cell runs in a process of its own, with :data:`benchmarks.bench_memory.ALLOCATOR`'s
glibc settings (the resident set follows the live tensors): it builds the case and the route (each route holds its
own copy of the model), runs one plain step (forward, mean cross-entropy, backward, gradients dropped), resets the
high-water mark (``echo 5 > /proc/self/clear_refs``) and reads the resident set; it then calls the route once and
reads the high-water mark (*first call*: whatever a route builds on its first call is in it), resets again and calls
it a second time (*steady*). A figure is the peak above the resident set before that call, in MiB. The plain row
is the plain step measured the same way.

Run::

    python -m benchmarks.bench_peer_memory                    # about 4 minutes
    python -m benchmarks.bench_peer_memory --models hf-128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import bench_peers as bp
from benchmarks.bench_memory import ALLOCATOR, _status

DEFAULT_MODELS = ["linear-512", "hf-128", "hf-512"]


def _peak(call) -> float:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
    base = _status("VmRSS")
    call()
    return _status("VmHWM") - base


def run_cell(model: str, route: str) -> dict[str, float]:
    """``{"first": MiB, "steady": MiB}`` of ``route`` on ``model``, in this process."""
    torch.set_num_threads(2)
    case = bp.build_case(model)
    plain = bp.plain_step(case)
    fn = plain if route == "plain" else bp.FACTORIES[route](case)
    with bp._quiet():
        plain()
        return {"first": _peak(fn), "steady": _peak(fn)}


def cell(model: str, route: str) -> dict[str, float] | str:
    """:func:`run_cell` in a process of its own; the first line of the error where the route cannot run."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_peer_memory", "--cell", model, route],
                          capture_output=True, text=True, env={**os.environ, **ALLOCATOR})
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return f"n/a ({lines[-1][:80] if lines else 'failed'})"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, dict[str, float] | str]]) -> str:
    routes = ["plain", *bp.ROUTES]
    lines = ["| model | " + " | ".join(routes) + " |", "|---|" + "---:|" * len(routes)]
    for model, cells in results.items():
        row = []
        for route in routes:
            c = cells[route]
            row.append(c if isinstance(c, str) else f"{c['first']:.0f}, {c['steady']:.0f}")
        lines.append(f"| {model} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated subset of {bp.MODELS}")
    parser.add_argument("--cell", nargs=2, metavar=("MODEL", "ROUTE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell is not None:
        print(json.dumps(run_cell(*args.cell)))
        return ""
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in bp.MODELS:
            parser.error(f"unknown model {m!r}; choose from {bp.MODELS}")
    results = {m: {r: cell(m, r) for r in ["plain", *bp.ROUTES]} for m in models}
    text = ("Peak MiB above the resident set before the call (first call, steady), each cell a process of its own\n\n"
            + table(results))
    print(text)
    return text


if __name__ == "__main__":
    main()
