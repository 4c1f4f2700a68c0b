"""The geometry of training on scikit-learn's digits: ‖∇ₓℓ‖, ‖∇θℓ‖ and the MLP-inequality ratio over time.

The same MLP (64 → 128 → 128 → 10, ReLU, Adam) is trained three ways — ``plain``, with the data-gradient
penalty ``DataGradientPenalty(λ)`` (λ·mean‖∇ₓℓᵢ‖²) and with the parameter-gradient penalty
``ParameterGradientPenalty(μ)`` (μ·‖∇θL‖²) — while three monitors watch it, every ``every_n_steps`` steps:

- ``GradientNormMonitor``: mean per-sample ‖∇ₓℓᵢ‖ and ‖∇θℓᵢ‖ (and more, see its docstring);
- ``MLPInequalityMonitor``: the ratio ‖∇ₓℓ‖²·Σₜ(1 + ‖h⁽ᵗ⁾‖²)/(‖W⁽ᵗ⁾‖₂²‖∇ₓh⁽ᵗ⁾‖₂²) / ‖∇θℓ‖² ∈ [0, 1];
- ``SpectralNormMonitor``: Πₜ σ(W⁽ᵗ⁾), the Lipschitz upper bound.

It saves ``<out_dir>/gradient_geometry.png`` (one panel per quantity, one line per training) and, with the
default W&B logger (offline: no account needed; ``wandb sync`` later), every monitored value, histogram,
table and lhs-against-rhs chart, plus the figure in a ``summary`` run.

Run (jsonargparse CLI, the parser behind LightningCLI)::

    python -m examples.gradient_geometry                      # ~1 min on one CPU core
    python -m examples.gradient_geometry --epochs 5 --logger none --variants '[plain, data_penalty]'
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_gp.callbacks import DataGradientPenalty, ParameterGradientPenalty
from lightning_gp.monitors import GradientNormMonitor, MLPInequalityMonitor, SpectralNormMonitor
from lightning_gp.monitors._base import Monitor

try:
    from examples._digits import N_CLASSES, N_FEATURES, DigitsDataModule, digits_tensors, log_summary, make_logger
except ImportError:  # run as a file: python examples/gradient_geometry.py (lightning_gp installed)
    from _digits import N_CLASSES, N_FEATURES, DigitsDataModule, digits_tensors, log_summary, make_logger  # type: ignore[no-redef]

Variant = Literal["plain", "data_penalty", "param_penalty"]
VARIANTS: tuple[Variant, ...] = ("plain", "data_penalty", "param_penalty")
LABELS = {"plain": "plain", "data_penalty": "data-gradient penalty", "param_penalty": "parameter-gradient penalty"}
PROJECT = "lightning-gp-gradient-geometry"
#: (key logged by the monitors, panel title, log-scale y axis)
PANELS = (
    ("grad_norm/input_mean", "mean ‖∇ₓℓᵢ‖ (input gradient)", True),
    ("grad_norm/param_per_sample_mean", "mean ‖∇θℓᵢ‖ (parameter gradient)", True),
    ("mlp_inequality/ratio_mean", "MLP-inequality ratio lhs/rhs (mean)", False),
    ("lipschitz/upper_bound", "Π σ(W): Lipschitz upper bound", True),
)


class DigitsMLP(L.LightningModule):
    """An ordinary classifier; nothing in it knows about penalties or monitors."""

    def __init__(self, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class FullBatches(DigitsDataModule):
    """The digits with the last, partial training batch dropped (1347 = 21·64 + 3): a measurement on
    3 samples would show as a spike in every curve."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)


class History(Callback):
    """Collects what the monitors logged, per step, for the figure (put it after the monitors)."""

    def __init__(self, monitors: list[Monitor]) -> None:
        self.monitors, self.rows = monitors, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for m in self.monitors:
            if m.last_logged_step is not None:
                self.rows.setdefault(m.last_logged_step, {}).update(m.last_logged)


def make_callbacks(variant: Variant, data_weight: float, param_weight: float) -> list[Callback]:
    if variant == "data_penalty":
        return [DataGradientPenalty(data_weight)]
    if variant == "param_penalty":
        return [ParameterGradientPenalty(param_weight)]
    return []


def plot(series: dict[str, dict[int, dict[str, float]]], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # two panels a row: each readable at a documentation page's width (a row of four shrinks the labels to ~5 px)
    rows = -(-len(PANELS) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 3.9 * rows), squeeze=False)
    axes = axes.flatten()
    for ax in axes[len(PANELS):]:
        ax.set_visible(False)
    for ax, (key, label, log) in zip(axes, PANELS, strict=False):
        for variant, rows in series.items():
            steps = sorted(s for s, r in rows.items() if key in r)
            ax.plot([s + 1 for s in steps], [rows[s][key] for s in steps], label=LABELS[variant], lw=1.4)
        ax.set(title=label, xlabel="optimizer step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    epochs: int = 15,
    variants: list[Variant] | None = None,
    hidden: int = 128,
    lr: float = 1e-3,
    batch_size: int = 64,
    data_weight: float = 1.0,
    param_weight: float = 0.1,
    every_n_steps: int = 10,
    max_samples: int = 64,
    seed: int = 0,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "gradient_geometry_out",
    progress_bar: bool = True,
    threads: int | None = 1,
) -> dict:
    """Train once per variant with the three monitors, plot the monitored geometry, print a summary.

    Args:
        epochs: training epochs (1347 training digits, ``batch_size`` per step, the partial batch dropped).
        variants: which trainings to run.
        hidden: width of the two hidden layers.
        lr: Adam learning rate.
        batch_size: training batch size.
        data_weight: λ of ``DataGradientPenalty`` (λ·mean‖∇ₓℓᵢ‖²).
        param_weight: μ of ``ParameterGradientPenalty`` (μ·‖∇θL‖²).
        every_n_steps: how often the monitors measure (also Lightning's ``log_every_n_steps``).
        max_samples: samples per measurement of the MLP inequality.
        seed: ``L.seed_everything(seed)`` before each run: same initial weights and batch order.
        logger: ``wandb`` (offline), ``csv`` or ``none``.
        out_dir: where the figure and the logs go.
        progress_bar: show Lightning's progress bar.
        threads: ``torch.set_num_threads``; None leaves PyTorch's default (tiny matrices: 1 is fastest).

    Returns:
        ``{"series": {variant: {step: {key: value}}}, "final": {variant: {...}}, "figure": path}``.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    variants = list(VARIANTS) if variants is None else list(variants)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    group = f"gradient-geometry-{time.strftime('%Y%m%d-%H%M%S')}"
    datamodule = FullBatches(batch_size=batch_size)
    _, _, x_test, y_test = digits_tensors()
    series, final = {}, {}
    for variant in variants:
        L.seed_everything(seed, workers=True)
        model = DigitsMLP(hidden=hidden, lr=lr)
        monitors: list[Monitor] = [
            GradientNormMonitor(every_n_steps=every_n_steps),
            MLPInequalityMonitor(every_n_steps=every_n_steps, max_samples=max_samples),
            SpectralNormMonitor(every_n_steps=every_n_steps),
        ]
        history = History(monitors)
        trainer = L.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1,
            callbacks=[*make_callbacks(variant, data_weight, param_weight), *monitors, history],
            logger=make_logger(logger, out, variant, group, PROJECT, variant), log_every_n_steps=every_n_steps,
            enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress_bar,
            default_root_dir=str(out),
        )  # fmt: skip
        print(f"\n=== {LABELS[variant]} ===", flush=True)
        start = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
        series[variant] = history.rows
        last = history.rows[max(history.rows)] if history.rows else {}
        final[variant] = {"test_acc": accuracy, "seconds": seconds, **{k: last.get(k) for k, _, _ in PANELS}}
        if logger == "wandb":
            import wandb

            wandb.finish()  # else the next WandbLogger would attach to this run

    header = "| training | test acc | mean ‖∇ₓℓ‖ | mean ‖∇θℓ‖ | ratio | Π σ(W) | fit s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for v, f in final.items():
        values = " | ".join("n/a" if f[k] is None else f"{f[k]:.4g}" for k, _, _ in PANELS)
        lines.append(f"| {LABELS[v]} | {f['test_acc']:.3f} | {values} | {f['seconds']:.1f} |")
    table = "\n".join(lines)
    print("\nAt the last measurement:\n" + table, flush=True)
    (out / "summary.md").write_text(table + "\n")
    figure = plot(series, out / "gradient_geometry.png", f"Digits MLP ({epochs} epochs): geometry of training")
    print(f"\nwrote {figure} and {out / 'summary.md'}", flush=True)
    if logger == "wandb":
        log_summary(PROJECT, group, out, {"gradient_geometry": figure})
    return {"series": series, "final": final, "figure": str(figure), "table": table}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
