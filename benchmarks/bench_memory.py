"""Peak memory and step time of each embedding-space callback, SAM and the monitors, against the same math by hand.

Setting (``--model``), CPU, 2 threads, SGD, ε = 1, dict batches with padding:

- ``encoder``: :mod:`benchmarks.bench_targets`' token classifier (embedding → ``nn.TransformerEncoder`` → masked
  mean pooling → linear), *tiny* 2 layers × 128, T = 64 and *mid* 4 layers × 256, T = 128, B = 64;
- ``gpt2``: the same head on Hugging Face's ``GPT2Model`` (built from a local config), *tiny* 2 layers × 64 and
  *mid* 4 layers × 256, T = 128, B = 8.

Memory. Each cell runs in a process of its own (``--cell NAME --size SIZE``): it builds the model and the batch,
runs one plain step by hand (forward, backward, gradients dropped), then resets the process's high-water mark
(``echo 5 > /proc/self/clear_refs``) and reads the resident set (``VmRSS``); it then fits 3 steps in a ``Trainer``
(the callback on the plain module, or the hand-written module alone) and reads the high-water mark (``VmHWM``),
with glibc told to return freed blocks of 64 KiB or more to the system (:data:`ALLOCATOR`), so that the resident
set follows the live tensors. A cell's figure is the peak above that resident set, in MiB; a row's ratio is the
callback's figure ÷ its reference's (the hand-written twin, or a plain step for the gradient-norm monitor, which
has none), each the median of ``--repeats`` processes (1 by default: repeated cells agreed within 0.5 %).

Time (``--time``). In this process, with the default allocator: every cell one fit a round (``--warmup`` steps
dropped, the median of ``--steps`` kept), the order rotated from round to round; a row's figure is the median over
``--rounds`` of the within-round ratio to its reference, with the range.

The hand-written steps are those :mod:`benchmarks.bench_targets` times (the same K, α, ε and weight as the
callbacks' defaults); ``tests/docs/test_benchmarks.py`` checks each trains to its callback's parameters in float64.

Run::

    python -m benchmarks.bench_memory --time                  # the encoder, both sizes (about 25 minutes)
    python -m benchmarks.bench_memory --model gpt2 --time
    python -m benchmarks.bench_memory --sizes tiny
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import benchmarks.bench_targets as bt
from benchmarks.bench_callbacks import RepeatedBatch
from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
)
from lightning_gp.functional.penalties import (
    finite_difference_direction,
    input_step_from_statistics,
    input_step_statistics,
    parameter_step_size,
)
from lightning_gp.functional.precision import default_step
from lightning_gp.monitors import GradientNormMonitor, SharpnessMonitor

#: glibc's allocator returns every block of 64 KiB or more to the system when freed (and keeps one arena), so the
#: resident set follows the live tensors: without it the same cell's peak moved by ±20 % from process to process.
ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1", "MALLOC_TRIM_THRESHOLD_": "0"}
#: model: {size: (layers, width, heads, T)}; the encoder as in bench_targets, GPT-2 as the issue measured it
SIZES = {"encoder": {"tiny": (2, 128, 4, 64), "mid": (4, 256, 4, 128)},
         "gpt2": {"tiny": (2, 64, 2, 128), "mid": (4, 256, 4, 128)}}
BATCH = {"encoder": 64, "gpt2": 8}
STEPS = 3
RHO = 0.05
LAMBDA = 0.1


class HandFGMAdversarialOnly(bt.HandFGM):
    """FGM by hand, trained on the adversarial loss alone (``adversarial_weight=1``)."""

    def training_step(self, batch, batch_idx):
        _, r = self.clean_and_perturbation(batch, keep_graph=False)  # the clean graph is freed here
        return self._loss_with(batch, lambda module, args, out: out + r)


class HandDataPenaltyDB(bt.HandFGM):
    """λ·mean‖∇ₑℓᵢ‖² on the embedding output e by hand, double backward: ∇ₑL with its graph, one backward."""

    def training_step(self, batch, batch_idx):
        loss, delta, _ = self.leaf_loss(batch)
        (g,) = torch.autograd.grad(loss, delta, create_graph=True)
        per_sample = g * g.shape[0]  # ∇ₑℓᵢ of a mean-reduced loss
        return loss + LAMBDA * per_sample.square().flatten(1).sum(1).mean()


class HandDataPenaltyFD(bt.HandFGM):
    """λ·mean‖∇ₑℓᵢ‖² on the embedding output e, by finite differences by hand: ∇ₑL and ∇θL in one backward (the
    graph freed), a second pass at e + h·d, and an objective whose one backward runs through that pass only (∇θL
    enters linearised)."""

    def training_step(self, batch, batch_idx):
        params = [p for p in self.parameters() if p.requires_grad]
        loss, delta, e = self.leaf_loss(batch)
        found = torch.autograd.grad(loss, [delta, *params], allow_unused=True)  # frees the graph
        g_e = found[0] * delta.shape[0]  # ∇ₑℓᵢ of a mean-reduced loss
        g_p = [torch.zeros_like(p) if g is None else g for p, g in zip(params, found[1:], strict=True)]
        phi, d = finite_difference_direction(g_e)
        real = batch["attention_mask"].unsqueeze(-1).to(e.dtype)  # h from the real positions, as the callback's
        h = input_step_from_statistics(input_step_statistics(e * real, d)[None], default_step("input", g_e.dtype))
        moved = self._loss_with(batch, lambda module, args, out: out + h * d)
        k = LAMBDA / h  # ∇θ mean φ ≈ (∇θL(e + h·d) − ∇θL(e)) / h
        linear = sum((p * (g * (1 - k))).sum() for p, g in zip(params, g_p, strict=True))
        return loss.detach() + LAMBDA * phi.mean() + linear - linear.detach() + k * (moved - moved.detach())


class HandParameterPenaltyFD(bt.TokenClassifier):
    """γ·‖∇θL‖² by finite differences by hand: g (the graph freed), θ += h·g, ∇θL there (that graph freed), θ put
    back, and an objective with the gradient g + 2γ·(∇θL(θ + h·g) − g)/h and no graph of its own."""

    def training_step(self, batch, batch_idx):
        params = [p for p in self.parameters() if p.requires_grad]
        loss = self.loss(batch)
        g = torch.autograd.grad(loss, params)
        g_sq = sum(t.square().sum() for t in g)
        h = parameter_step_size(params, g_sq.sqrt(), default_step("parameter", g[0].dtype))
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, t in zip(params, g, strict=True):
                p.add_(t, alpha=h)
        moved = torch.autograd.grad(self.loss(batch), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        total = [a + LAMBDA * 2 * (b - a) / h for a, b in zip(g, moved, strict=True)]
        linear = sum((p * t).sum() for p, t in zip(params, total, strict=True))
        return loss.detach() + LAMBDA * g_sq + linear - linear.detach()


class HandSAM(bt.TokenClassifier):
    """SAM by hand, as its reference implementation steps (davda54/sam): a backward, θ += ε = ρ·g/‖g‖ with the
    gradients dropped, a second backward, θ −= ε, the optimizer's step. Manual optimization (two backward passes)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        params = [p for p in self.parameters() if p.requires_grad]
        loss = self.loss(batch)
        self.manual_backward(loss)
        with torch.no_grad():
            scale = RHO / torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            e_w = [p.grad * scale for p in params]
            for p, e in zip(params, e_w, strict=True):
                p.add_(e)
        opt.zero_grad(set_to_none=True)  # the reference's first_step(zero_grad=True): g is freed here
        self.manual_backward(self.loss(batch))
        with torch.no_grad():
            for p, e in zip(params, e_w, strict=True):
                p.sub_(e)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()


SHARPNESS_ITERATIONS = 3


class HandSharpness(bt.TokenClassifier):
    """λ_max of the step's loss measured by hand before the step, as :class:`SharpnessMonitor` does: a pass of its
    own, the gradient with its graph, ``SHARPNESS_ITERATIONS`` power-iteration steps on Hessian-vector products by
    double backward (that graph freed after), then the step's own loss."""

    def training_step(self, batch, batch_idx):
        params = [p for p in self.parameters() if p.requires_grad]
        grads = torch.autograd.grad(self.loss(batch), params, create_graph=True)
        v = [torch.randn_like(p) for p in params]
        for _ in range(SHARPNESS_ITERATIONS):
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in v]))
            v = [t / norm for t in v]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            float(sum((a * b).sum() for a, b in zip(v, hv, strict=True)))  # vᵀHv, read as the monitor reads it
            v = list(hv)
        del grads, hv
        return self.loss(batch)


def _fgm(weight: float) -> Callable[[], AdversarialTraining]:
    return lambda: AdversarialTraining(bt.EPS, steps=1, adversarial_weight=weight, target="embed")


#: cell name: (module class, callback factory or None)
CELLS: dict[str, tuple[type, Callable[[], object] | None]] = {
    "plain": (bt.TokenClassifier, None),
    "FGM (weight 0.5), callback": (bt.TokenClassifier, _fgm(bt.WEIGHT)),
    "FGM (weight 0.5), hand-written": (bt.HandFGM, None),
    "FGM (adversarial only), callback": (bt.TokenClassifier, _fgm(1.0)),
    "FGM (adversarial only), hand-written": (HandFGMAdversarialOnly, None),
    "FreeLB K=3, callback": (bt.TokenClassifier, lambda: AdversarialTraining(bt.EPS, steps=bt.K, average_steps=True,
                                                                             target="embed")),
    "FreeLB K=3, hand-written": (bt.HandFreeLB, None),
    "data penalty, double backward, callback": (
        bt.TokenClassifier, lambda: DataGradientPenalty(LAMBDA, target="embed", method="double_backward")),
    "data penalty, double backward, hand-written": (HandDataPenaltyDB, None),
    "data penalty, finite difference, callback": (
        bt.TokenClassifier, lambda: DataGradientPenalty(LAMBDA, target="embed", method="finite_difference")),
    "data penalty, finite difference, hand-written": (HandDataPenaltyFD, None),
    # the encoder's attention (SDPA) has no double backward here: "auto" decides so on a trial pass of step 0
    "data penalty, auto, callback": (bt.TokenClassifier, lambda: DataGradientPenalty(LAMBDA, target="embed")),
    "parameter penalty, finite difference, callback": (
        bt.TokenClassifier, lambda: ParameterGradientPenalty(LAMBDA, method="finite_difference")),
    "parameter penalty, finite difference, hand-written": (HandParameterPenaltyFD, None),
    "SAM (ρ = 0.05), callback": (bt.TokenClassifier, lambda: SharpnessAwareMinimization(RHO)),
    "SAM (ρ = 0.05), hand-written": (HandSAM, None),
    "SharpnessMonitor, every step, callback": (bt.TokenClassifier, lambda: SharpnessMonitor(
        every_n_steps=1, iterations=SHARPNESS_ITERATIONS, tol=0.0, method="double_backward")),
    "SharpnessMonitor, every step, hand-written": (HandSharpness, None),
    "GradientNormMonitor, recompute, every step": (bt.TokenClassifier, lambda: GradientNormMonitor(
        every_n_steps=1, target="embed", mask_key="attention_mask", histograms=False)),
    "GradientNormMonitor, fused, every step": (bt.TokenClassifier, lambda: GradientNormMonitor(
        every_n_steps=1, target="embed", mask_key="attention_mask", histograms=False, mode="fused")),
}
#: callback row: its hand-written twin
ROWS = {"FGM (weight 0.5), callback": "FGM (weight 0.5), hand-written",
        "FGM (adversarial only), callback": "FGM (adversarial only), hand-written",
        "FreeLB K=3, callback": "FreeLB K=3, hand-written",
        "data penalty, double backward, callback": "data penalty, double backward, hand-written",
        "data penalty, finite difference, callback": "data penalty, finite difference, hand-written",
        "data penalty, auto, callback": "data penalty, finite difference, hand-written",
        "parameter penalty, finite difference, callback": "parameter penalty, finite difference, hand-written",
        "SAM (ρ = 0.05), callback": "SAM (ρ = 0.05), hand-written",
        "SharpnessMonitor, every step, callback": "SharpnessMonitor, every step, hand-written",
        # no hand-written twin: the monitor's step ÷ a plain step
        "GradientNormMonitor, recompute, every step": "plain",
        "GradientNormMonitor, fused, every step": "plain"}


#: Cells run with SDPA's math kernel, which has a double backward (the fused CPU kernel has none).
MATH_ATTENTION = {"data penalty, double backward, callback", "data penalty, double backward, hand-written",
                  "SharpnessMonitor, every step, callback", "SharpnessMonitor, every step, hand-written"}


def attention_for(name: str) -> contextlib.AbstractContextManager[None]:
    """The attention kernel cell ``name`` trains with (:data:`MATH_ATTENTION`)."""
    return sdpa_kernel(SDPBackend.MATH) if name in MATH_ATTENTION else contextlib.nullcontext()


def _status(field: str) -> float:
    """``field`` of /proc/self/status (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark needs Linux")


def configure(model: str, size: str) -> None:
    """Set :mod:`benchmarks.bench_targets`' model to ``model`` at ``size`` (its module-level settings)."""
    bt.ARCH, bt.B = model, BATCH[model]
    bt.LAYERS, bt.D, bt.HEADS, bt.T = SIZES[model][size]


def run_cell(name: str, size: str, model: str = "encoder") -> float:
    """The peak memory (MiB) of ``name``'s 3-step fit above the resident set after the model and one plain step."""
    configure(model, size)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cls, factory = CELLS[name]
    module = cls()
    batch = bt.make_batch()
    module.loss(batch).backward()  # one plain step's allocations, as the reference point
    module.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _status("VmRSS")
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[factory()] if factory is not None else [])
    with attention_for(name):
        trainer.fit(module, train_dataloaders=RepeatedBatch(batch, STEPS))
    return _status("VmHWM") - base


def cell_peak(name: str, size: str, model: str = "encoder") -> float:
    """:func:`run_cell` in a process of its own, with :data:`ALLOCATOR`'s settings."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_memory", "--cell", name, "--size", size,
                           "--model", model], capture_output=True, text=True, check=True,
                          env={**os.environ, **ALLOCATOR})
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def measure(sizes: list[str], repeats: int, model: str = "encoder") -> dict[str, dict[str, float]]:
    """``{size: {cell: median peak MiB over repeats}}``, each cell in fresh processes."""
    return {size: {name: statistics.median(cell_peak(name, size, model) for _ in range(repeats)) for name in CELLS}
            for size in sizes}


def measure_time(size: str, model: str, rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """``{cell: [median kept step time of round r, ...]}`` in this process (default allocator): every cell one
    fit a round, the order rotated from round to round, so that drifts in the machine's speed hit all alike."""
    configure(model, size)
    torch.set_num_threads(2)
    batch = bt.make_batch()
    names = list(CELLS)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with attention_for(name):
                times = bt.fit_steps(*CELLS[name], batch, warmup + steps)
            per_round[name].append(statistics.median(times[warmup:]))
    return per_round


def _time_ratio(times: dict[str, list[float]], row: str, ref: str) -> str:
    """The median over rounds of the within-round ratio, with its range."""
    ratios = [a / b for a, b in zip(times[row], times[ref], strict=True)]
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def table(peaks: dict[str, dict[str, float]], times: dict[str, dict[str, list[float]]] | None = None) -> str:
    """The markdown table: per size, peak MiB ÷ the reference's and (with ``times``) step time ÷ the reference's."""
    sizes = list(peaks)
    timed = [s for s in sizes if times and s in times]
    head = "| row | " + " | ".join(f"{s}: MiB (÷ reference)" for s in sizes)
    head += "".join(f" | {s}: time ÷ reference (range)" for s in timed) + " |"
    lines = [head, "|---|" + "---:|" * (len(sizes) + len(timed))]
    plain = " | ".join(f"{peaks[s]['plain']:.1f}" for s in sizes)
    plain += "".join(f" | {statistics.median(times[s]['plain']) * 1e3:.0f} ms" for s in timed)  # type: ignore[index]
    lines.append(f"| plain step | {plain} |")
    for row, ref in ROWS.items():
        cells = [f"{peaks[s][row]:.1f} ÷ {peaks[s][ref]:.1f} = **{peaks[s][row] / peaks[s][ref]:.2f}**"
                 for s in sizes]
        cells += [_time_ratio(times[s], row, ref) for s in timed]  # type: ignore[index]
        label = row.removesuffix(", callback") + (" (÷ plain)" if ref == "plain" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(SIZES), default="encoder")
    parser.add_argument("--sizes", nargs="+", choices=["tiny", "mid"], default=["tiny", "mid"])
    parser.add_argument("--repeats", type=int, default=1, help="processes a cell (the median is kept)")
    parser.add_argument("--time", action="store_true", help="also time every cell, in this process")
    parser.add_argument("--time-only", action="store_true", help="time every cell, measure no memory")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (with --time)")
    parser.add_argument("--steps", type=int, default=3, help="kept steps a fit (with --time)")
    parser.add_argument("--warmup", type=int, default=1, help="steps dropped a fit (with --time)")
    parser.add_argument("--cell", choices=list(CELLS), help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=["tiny", "mid"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell is not None:  # one cell, in this process
        print(json.dumps({"peak_mib": run_cell(args.cell, args.size, args.model)}))
        return ""
    times = ({s: measure_time(s, args.model, args.rounds, args.steps, args.warmup) for s in args.sizes}
             if args.time or args.time_only else None)
    if args.time_only:
        text = "\n".join(f"{s}: plain step {statistics.median(t['plain']) * 1e3:.0f} ms; " + "; ".join(
            f"{row} {_time_ratio(t, row, ref)}" for row, ref in ROWS.items()) for s, t in times.items())  # type: ignore[union-attr]
        print(text)
        return text
    text = table(measure(args.sizes, args.repeats, args.model), times)
    print(text)
    return text


if __name__ == "__main__":
    main()
