"""Timing utilities shared by the benchmarks: medians of repeated runs, warm-up excluded, reported as
ratios against a plain training step measured in the same process, so machine noise cancels out."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], object], *, device: torch.device, warmup: int = 5, repeats: int = 30) -> float:
    """Median wall time of ``fn()`` in seconds (``repeats`` runs after ``warmup`` discarded ones)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(
    fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int = 5, repeats: int = 30
) -> dict[str, float]:
    """Median time of each function, measured round-robin so that drifts in machine load hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            _sync(device)
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
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda"))
    return out
