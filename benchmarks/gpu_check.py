"""One command for a GPU machine: the CUDA tier of the tests and the main benchmarks in at most 8 minutes, with a
short report of absolute times and ratios to a plain step.

Run ``bash benchmarks/gpu_check.sh`` (or ``python -m benchmarks.gpu_check``) from the repository root. The report
goes to ``--out`` (default ``$OUT/gpu_check.md`` where ``OUT`` is set, else ``gpu_check_report.md``) and to stdout.
Parts, each with its own time limit inside the overall budget (a part that would not fit is reported as skipped):

1. the CUDA tier, ``pytest -m cuda tests/integration/test_cuda.py``: every callback, the mixin and the monitors on CUDA
   in 32-true, bf16-mixed and 16-mixed, dropout replay with CUDA's RNG, SDPA flash and memory-efficient attention,
   no host synchronisation inside a step;
2. callbacks ÷ hand-written loops, SAM among them (``bench_callbacks``);
3. finite differences ÷ double backward (``bench_functional``);
4. per-sample gradient norms against Opacus, BackPACK and ``torch.func`` (``bench_peers``; ``bench_grad_norms``
   where the peers are not installed).

Without a GPU it is a smoke test (CI runs it so, ``--smoke``): the CUDA tier is collected and skipped, and only the
quickest benchmark runs, on the CPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BUDGET_S = 480  # 8 minutes, all parts together
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Part:
    title: str
    args: list[str]
    limit_s: int
    smoke: bool = False  # runs in the CPU smoke test too


def parts(gpu: bool) -> list[Part]:
    quick = ["--quick"]
    peers = (["-m", "benchmarks.bench_peers", "--quick", "--no-progress", "--device", "cuda" if gpu else "cpu"]
             if importlib.util.find_spec("opacus") and importlib.util.find_spec("backpack")
             else ["-m", "benchmarks.bench_grad_norms", *quick])
    return [
        Part("CUDA tier of the tests", ["-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                        "--no-header", "-rfEs", "tests/integration/test_cuda.py"], 240, smoke=True),
        Part("callbacks ÷ hand-written loops (SAM included)", ["-m", "benchmarks.bench_callbacks", *quick], 90),
        Part("finite differences ÷ double backward", ["-m", "benchmarks.bench_functional", *quick], 45, smoke=True),
        Part("per-sample gradient norms against the peers", peers, 90),
    ]


def environment() -> str:
    lines = [f"- Python {platform.python_version()}, torch {torch.__version__}"]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"- GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                     f"TF32 matmul {torch.backends.cuda.matmul.allow_tf32}")
    else:
        lines.append("- no GPU: smoke test on the CPU (the CUDA tier is skipped)")
    try:
        import lightning

        lines.append(f"- lightning {lightning.__version__}")
    except ImportError:  # pragma: no cover
        pass
    return "\n".join(lines)


def run(part: Part, limit: float, env: dict) -> tuple[str, float, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, *part.args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=limit)
        status = "passed" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        output = proc.stdout + ("\n" + proc.stderr[-3000:] if proc.returncode else "")
    except subprocess.TimeoutExpired as err:
        status = f"stopped at its limit ({limit:.0f} s)"
        output = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
    return status, time.perf_counter() - start, output.strip()


def _tables(output: str) -> str:
    """The Markdown tables and their titles from a benchmark's output; a test run's summary lines."""
    keep = [ln for ln in output.splitlines()
            if ln.startswith(("|", "###", "Plain step", "Verdict", "FAILED", "ERROR", "SKIPPED"))
            or " passed" in ln or " failed" in ln]
    return "\n".join(keep[-80:]) or output[-2000:]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="where to write the report (Markdown)")
    parser.add_argument("--smoke", action="store_true", help="the CPU smoke test (default without a GPU)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts (default 480)")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.smoke
    out = Path(args.out or (Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT")
                            else REPO / "gpu_check_report.md"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    if gpu:
        env["LGP_BENCH_DEVICES"] = "cuda"  # the CPU rows would only spend the budget
    start = time.perf_counter()
    sections = [f"# GPU check ({time.strftime('%Y-%m-%d %H:%M')})", "", environment(), ""]
    for part in parts(gpu):
        if not gpu and not part.smoke:
            sections += [f"## {part.title}", "", "skipped: smoke test (no GPU)", ""]
            continue
        left = args.budget - (time.perf_counter() - start)
        if left < min(part.limit_s, 20):
            sections += [f"## {part.title}", "", f"skipped: {left:.0f} s of the budget left", ""]
            continue
        status, seconds, output = run(part, min(part.limit_s, left), env)
        print(f"{part.title}: {status} in {seconds:.0f} s", flush=True)
        sections += [f"## {part.title}", "", f"{status} in {seconds:.0f} s: `python {' '.join(part.args)}`", "",
                     _tables(output), ""]
    sections.append(f"Total: {time.perf_counter() - start:.0f} s of a {args.budget:.0f} s budget.")
    report = "\n".join(sections)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(report)
    return report


if __name__ == "__main__":
    main()
