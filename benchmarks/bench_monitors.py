"""Cost of the monitors inside a Lightning Trainer, against a plain training step.

MLP 64→512→512→10, batch 256, SGD (the issue's reference setting). Each configuration is a real
``Trainer.fit``; a timing callback takes the wall time of every step from the first callback's
``on_train_batch_start`` to the last callback's ``on_train_batch_end`` (so the monitors' own hooks, the
forward, backward and optimizer step are inside, data loading is not). The first ``warmup`` steps of
each fit are dropped. The configurations run round-robin, one fit each per round, so that drifts in
machine load hit all alike; a row is the median over the pooled steps of all rounds. Monitors that
measure every step are compared by that median; at the default interval (``log_every_n_steps=50``) a
monitor costs nothing on 49 steps of 50, so those rows give the *mean* step time (the amortised cost),
next to the plain step's mean. No logger is attached: the rows time the measurement, not a logger's I/O.

Target (issue 5): ``GradientNormMonitor(every_n_steps=1)`` ≤ 1.15× a plain step; that is the fused mode
(``mode="fused"``); the default ``mode="recompute"`` pays a second forward/backward and is reported too.
``MLPInequalityMonitor`` is reported as its cost per call (its every-step time minus the plain step).

Two more models, plain step vs ``GradientNormMonitor(every_n_steps=1, mode="fused")`` only (target, issue 13:
≤ 1.25×), one fit of each per round in alternating order, as the median of per-round ratios (each round's
median fused step ÷ its median plain step) with their spread: the CNN of ``benchmarks.bench_peers`` (2 conv +
2 linear) on (128, 3, 32, 32), and its tiny BERT (``BertForSequenceClassification``, hidden 128, 2 layers,
T=64, B=32), whose monitor takes ‖∇ℓᵢ‖ at the word embeddings' output (``target=``), as a token model's users
would.

Run::

    python -m benchmarks.bench_monitors              # CPU, torch's default thread count
    python -m benchmarks.bench_monitors --quick      # fewer steps and rounds (noisier)
    python -m benchmarks.bench_monitors --threads 1
    python -m benchmarks.bench_monitors --models cnn,bert    # a subset of mlp, cnn, bert
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import Row, format_table, load_note, ratio_stats
from lightning_gp.monitors.gradient_norm import GradientNormMonitor
from lightning_gp.monitors.mlp_inequality import MLPInequalityMonitor
from lightning_gp.monitors.sharpness import SharpnessMonitor
from lightning_gp.monitors.spectral_norm import SpectralNormMonitor

#: The clock of the timing callback (``--clock``): wall time, or CPU time of the process (all its threads).
CLOCK = [time.perf_counter]
TARGET = 1.15  # GradientNormMonitor at every step vs a plain step
TARGET_OTHERS = 1.25  # the same on the CNN and the tiny BERT (issue 13)
BATCH = 256
MODELS = ("mlp", "cnn", "bert")


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class _Start(pl.Callback):
    def __init__(self, times: list[float]) -> None:
        self.times = times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.times.append(CLOCK[0]())


class _End(pl.Callback):
    def __init__(self, times: list[float], starts: list[float]) -> None:
        self.times, self.starts = times, starts

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(CLOCK[0]() - self.starts[-1])


class Classifier(pl.LightningModule):
    """Any ``nn.Module`` mapping the batch's inputs to logits, trained with cross-entropy and SGD."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def other_model(name: str, tiny: bool = False) -> tuple[pl.LightningModule, TensorDataset, int, dict]:
    """The CNN or the tiny BERT of ``bench_peers`` (``tiny``: small sizes), its data, batch size and the
    monitor's extra arguments."""
    from benchmarks.bench_peers import build_case

    case = build_case(name, tiny=tiny)  # seeded
    batch = case.inputs.shape[0]
    n = batch * 4
    if name == "cnn":
        data = TensorDataset(torch.rand(n, *case.inputs.shape[1:]), torch.randint(0, 10, (n,)))
        return Classifier(case.model), data, batch, {}
    vocab = case.model.bert.config.vocab_size
    data = TensorDataset(torch.randint(0, vocab, (n, case.inputs.shape[1])), torch.randint(0, 10, (n,)))
    return Classifier(case.model), data, batch, {"target": "model.bert.bert.embeddings.word_embeddings"}


def step_times(monitors: list[pl.Callback], steps: int, warmup: int,
               problem: tuple[pl.LightningModule, TensorDataset, int] | None = None) -> list[float]:
    """Wall time of each training step of one fit, the first ``warmup`` dropped (default problem: the MLP)."""
    torch.manual_seed(0)
    if problem is None:
        data = TensorDataset(torch.randn(BATCH * 8, 64), torch.randint(0, 10, (BATCH * 8,)))
        module, batch = MLP(), BATCH
    else:
        module, data, batch = problem
    starts: list[float] = []
    times: list[float] = []
    trainer = pl.Trainer(
        max_steps=warmup + steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=50,
        # the timers enclose every other callback's hooks
        callbacks=[_Start(starts), *monitors, _End(times, starts)],
    )
    trainer.fit(module, DataLoader(data, batch_size=batch, shuffle=True, drop_last=True))
    return times[warmup:]


CONFIGS: dict[str, tuple[Callable[[], list[pl.Callback]], float | None, str]] = {
    # name: (monitors, target, statistic)
    "plain step": (lambda: [], None, "median"),
    "GradientNormMonitor(every_n_steps=1, mode='fused')": (
        lambda: [GradientNormMonitor(every_n_steps=1, mode="fused")], TARGET, "median"),
    "GradientNormMonitor(every_n_steps=1), recompute": (
        lambda: [GradientNormMonitor(every_n_steps=1)], None, "median"),
    "MLPInequalityMonitor(every_n_steps=1, max_samples=64)": (
        lambda: [MLPInequalityMonitor(every_n_steps=1)], None, "median"),
    "SpectralNormMonitor(every_n_steps=1)": (lambda: [SpectralNormMonitor(every_n_steps=1)], None, "median"),
    "SharpnessMonitor(every_n_steps=1), 20 products": (
        lambda: [SharpnessMonitor(every_n_steps=1, tol=0.0)], None, "median"),
    "plain step (mean)": (lambda: [], None, "mean"),
    "GradientNormMonitor(mode='fused'), default interval (mean)": (
        lambda: [GradientNormMonitor(mode="fused")], None, "mean"),
    "GradientNormMonitor(), default interval (mean)": (lambda: [GradientNormMonitor()], None, "mean"),
    "MLPInequalityMonitor(), default interval (mean)": (lambda: [MLPInequalityMonitor()], None, "mean"),
    "SharpnessMonitor(), default interval of 50 (mean)": (lambda: [SharpnessMonitor(tol=0.0)], None, "mean"),
}


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: perf_counter (default); cpu: process CPU time, steadier on a loaded machine")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--tiny", action="store_true", help="CNN and BERT on small sizes (smoke test)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in MODELS for m in models):
        parser.error(f"--models: choose from {MODELS}")
    CLOCK[0] = time.perf_counter if args.clock == "wall" else time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    # Step times vary by a few percent from one fit to the next (allocator and thread state), more than
    # within a fit: many short fits per row average that out better than a few long ones.
    rounds, steps, warmup = (2, 50, 5) if args.quick else (8, 50, 10)

    outs = []
    if "mlp" in models:
        outs.append(mlp_table(rounds, steps, warmup, args.clock))
    others = [m for m in models if m != "mlp"]
    if others:
        # the CNN's and BERT's steps are 10-30× the MLP's: fewer steps per fit, more fits
        o_rounds, o_steps, o_warmup = (2, 3, 1) if args.tiny else (4, 6, 2) if args.quick else (10, 12, 3)
        outs.append(fused_table(others, o_rounds, o_steps, o_warmup, args.clock, args.tiny))
    out = "\n\n".join(outs)
    print(out)
    return out


def mlp_table(rounds: int, steps: int, warmup: int, clock: str) -> str:
    pooled: dict[str, list[float]] = {name: [] for name in CONFIGS}
    mean_configs = {name for name, (_, _, stat) in CONFIGS.items() if stat == "mean"}
    for _ in range(rounds):
        for name, (monitors, _, _) in CONFIGS.items():
            if name == "plain step (mean)":
                continue  # the same fits as "plain step"
            pooled[name] += step_times(monitors(), steps, warmup)
    pooled["plain step (mean)"] = pooled["plain step"]
    stats = {n: (statistics.fmean(t) if n in mean_configs else statistics.median(t)) for n, t in pooled.items()}

    rows = []
    for name, (_, target, stat) in CONFIGS.items():
        base = stats["plain step (mean)" if stat == "mean" else "plain step"]
        rows.append(Row(name, stats[name], base, target))
    per_call = stats["MLPInequalityMonitor(every_n_steps=1, max_samples=64)"] - stats["plain step"]
    title = (f"CPU ({torch.get_num_threads()} threads, {clock} clock): monitors in a Trainer, "
             f"MLP 64→512→512→10, batch {BATCH} ({rounds} rounds × {steps} steps per row)")
    return (format_table(title, rows)
            + f"\n\nMLPInequalityMonitor (max_samples=64) cost per call: {per_call * 1e3:.2f} ms "
            + f"({per_call / stats['plain step']:.2f}× a plain step)")


def fused_table(models: list[str], rounds: int, steps: int, warmup: int, clock: str, tiny: bool = False) -> str:
    """Plain step vs the fused GradientNormMonitor at every step, per model: each round one fit of each, in
    alternating order; a round's ratio is the median fused step ÷ the median plain step of that round, and a
    row gives the median of the rounds' ratios and their interquartile range (min–max under 4 rounds)."""
    lines = [
        f"### CPU ({torch.get_num_threads()} threads, {clock} clock): fused GradientNormMonitor at every step "
        f"({rounds} rounds × {steps} steps per fit)",
        "",
        "| model | plain step, median ms | fused, median ms | × plain (median of rounds) | spread | target | met |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for name in models:
        per_round: dict[str, list[float]] = {"plain": [], "fused": []}
        label = ""
        for r in range(rounds):
            for kind in (("plain", "fused") if r % 2 == 0 else ("fused", "plain")):
                module, data, batch, kwargs = other_model(name, tiny)
                label = {"cnn": f"CNN (2 conv + 2 linear), batch {batch}",
                         "bert": f"tiny BERT, T={data.tensors[0].shape[1]}, batch {batch}"}[name]
                monitors = [GradientNormMonitor(every_n_steps=1, mode="fused", **kwargs)] if kind == "fused" else []
                per_round[kind].append(statistics.median(step_times(monitors, steps, warmup, (module, data, batch))))
        med, lo, hi = ratio_stats([f / p for f, p in zip(per_round["fused"], per_round["plain"], strict=True)])
        met = "yes" if med <= TARGET_OTHERS else "**no**"
        lines.append(f"| {label} | {statistics.median(per_round['plain']) * 1e3:.2f} | "
                     f"{statistics.median(per_round['fused']) * 1e3:.2f} | {med:.2f} | {lo:.2f}–{hi:.2f} | "
                     f"≤ {TARGET_OTHERS:.2f}× | {met} |")
    note = load_note(torch.get_num_threads())
    return "\n".join(lines) + (f"\n\nAfter: {note}." if note else "")


if __name__ == "__main__":
    main()
