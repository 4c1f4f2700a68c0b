"""Timing utilities shared by the benchmarks: medians of repeated runs, warm-up excluded, reported as
ratios against a plain training step measured in the same process, so machine noise cancels out."""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, device: torch.device, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time of ``fn()`` in seconds (``repeats`` runs after ``warmup`` discarded ones)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int = 5, repeats: int = 30
) -> dict[str, float]:
    """Median time of each function, measured round-robin so that drifts in machine load hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


@dataclass
class Row:
    name: str
    seconds: float
    baseline: float
    target: float | None = None

    @property
    def ratio(self) -> float:
        return self.seconds / self.baseline


def format_table(title: str, rows: list[Row]) -> str:
    """A Markdown table: name, median ms, ratio to the baseline, the target and whether it is met."""
    lines = [f"### {title}", "", "| step | median ms | × plain | target | met |", "|---|---:|---:|---:|:---:|"]
    for r in rows:
        target = f"≤ {r.target:.2f}×" if r.target is not None else ""
        met = "" if r.target is None else ("yes" if r.ratio <= r.target else "**no**")
        lines.append(f"| {r.name} | {r.seconds * 1e3:.2f} | {r.ratio:.2f} | {target} | {met} |")
    return "\n".join(lines)


def devices() -> list[torch.device]:
    """The CPU, and the GPU where there is one; ``LGP_BENCH_DEVICES`` (e.g. "cuda") keeps only those named."""
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    only = os.environ.get("LGP_BENCH_DEVICES")
    return [d for d in out if d.type in only.split(",")] if only else out


CPU = torch.device("cpu")


def _per_call(fn: Callable[[], object], calls: int, device: torch.device) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def interleaved_rounds(
    fns: dict[str, Callable[[], object]],
    *,
    rounds: int,
    min_ms: float,
    warmup: int = 2,
    rng: random.Random | None = None,
    device: torch.device = CPU,
    tick: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each function in each round. After ``warmup`` calls each (which also size the
    timings: a function is called back to back until one timing lasts ≥ ``min_ms``), every round times each
    function once, in an order shuffled anew per round, so that load drifts hit all alike. Divide by the
    same round's baseline for per-round ratios (`ratio_stats`)."""
    rng = rng or random.Random(0)
    calls = {}
    for name, fn in fns.items():
        per_call = min(_per_call(fn, 1, device) for _ in range(max(1, warmup)))
        calls[name] = max(1, round(min_ms / 1e3 / max(per_call, 1e-9)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            times[name].append(_per_call(fns[name], calls[name], device))
        if tick is not None:
            tick()
    return times


def ratio_stats(ratios: list[float]) -> tuple[float, float, float]:
    """Median and interquartile range (min–max under 4 values) of per-round ratios."""
    if len(ratios) < 4:
        return statistics.median(ratios), min(ratios), max(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), q1, q3


def load_note(own_threads: int = 0) -> str:
    """The machine's 1-minute load average against its cores, with a warning when others compete for them.

    ``own_threads``: the threads the benchmark itself kept busy just before (read after a run), which count
    towards the load average but are no competition.
    """
    import os

    try:
        load = os.getloadavg()[0]
    except OSError:  # not on this platform
        return ""
    cores = os.cpu_count() or 1
    note = f"load average {load:.1f} on {cores} cores"
    busy = load - own_threads > 0.75 * cores
    return note + (" (busy machine: ratios are unreliable, rerun on a quiet one)" if busy else "")
