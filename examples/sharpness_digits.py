"""Sharpness on noisy labels: plain SGD, SAM, ASAM, the parameter penalty and flooding, with λ_max watched.

scikit-learn's digits with 40 % of the training labels flipped to another class at random (the validation and
test labels stay clean). One ordinary LightningModule (MLP 64→256→256→10, SGD with momentum 0.9) is trained five
ways, one callback each:

- ``plain``: no callback;
- ``sam``: ``SharpnessAwareMinimization(ρ)``, the gradient at θ + ρ·g/‖g‖;
- ``asam``: ``SharpnessAwareMinimization(ρ_a, adaptive=True)``;
- ``param_penalty``: ``ParameterGradientPenalty(γ/4)`` (implicit gradient regularization made explicit);
- ``flooding``: ``Flooding(b)``, ascent below the loss level b.

A ``SharpnessMonitor`` logs λ_max, the Hessian's top eigenvalue on the step's batch, every ``monitor_every``
steps, next to 2/η. The checkpoint with the best accuracy on a clean validation split (a fifth of the training
digits) is tested; λ_max is also measured at the end of training on the whole (noisy) training set. The script
prints a Markdown table (mean ± sd over the seeds), writes it to ``<out_dir>/results.md`` and saves
``<out_dir>/sharpness_digits.png`` (λ_max over training, one line per method, with 2/η), also logged to W&B.

Run from the repository root; a jsonargparse CLI (the parser behind LightningCLI); W&B offline by default::

    python -m examples.sharpness_digits                          # 3 seeds, 5 trainings: about 90 s
    python -m examples.sharpness_digits --seeds '[0]' --epochs 10 --logger none
    python -m examples.sharpness_digits --print_config > sharp.yaml   # then: --config sharp.yaml
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_gp import Flooding, ParameterGradientPenalty, SharpnessAwareMinimization, SharpnessMonitor
from lightning_gp.functional import hessian_max_eigenvalue

try:
    from examples._digits import N_CLASSES, N_FEATURES, digits_tensors, log_summary, make_logger
except ImportError:  # run as a file: python examples/sharpness_digits.py (lightning_gp installed)
    from _digits import N_CLASSES, N_FEATURES, digits_tensors, log_summary, make_logger  # type: ignore[no-redef]

Variant = Literal["plain", "sam", "asam", "param_penalty", "flooding"]
VARIANTS: tuple[Variant, ...] = ("plain", "sam", "asam", "param_penalty", "flooding")
LABELS = {"plain": "plain", "sam": "SAM", "asam": "ASAM", "param_penalty": "parameter penalty",
          "flooding": "flooding"}
PROJECT = "lightning-gp-sharpness-digits"


def noisy_digits(noise: float, seed: int) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """(train with ``noise`` of its labels flipped to another class, clean validation, clean test)."""
    x_tr, y_tr, x_te, y_te = digits_tensors()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x_tr), generator=gen)
    n_val = len(x_tr) // 5
    val, train = order[:n_val], order[n_val:]
    y_noisy = y_tr[train].clone()
    flip = torch.rand(len(train), generator=gen) < noise
    shift = torch.randint(1, N_CLASSES, (len(train),), generator=gen)  # another class, uniformly
    y_noisy[flip] = (y_noisy[flip] + shift[flip]) % N_CLASSES
    return (TensorDataset(x_tr[train], y_noisy), TensorDataset(x_tr[val], y_tr[val]), TensorDataset(x_te, y_te))


class DigitsMLP(L.LightningModule):
    """An ordinary classifier: nothing in it knows about SAM, flooding or Hessians."""

    def __init__(self, hidden: int = 256, lr: float = 0.05, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, N_CLASSES))
        self.val_acc = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_acc = MulticlassAccuracy(N_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.val_acc(self(batch[0]), batch[1])
        self.log("val/acc", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self.test_acc(self(batch[0]), batch[1])
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class SharpnessLog(Callback):
    """Keeps the monitor's λ_max measurements of one run, for the chart."""

    def __init__(self, monitor: SharpnessMonitor) -> None:
        self.monitor, self.points = monitor, []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = self.monitor.last_logged_step
        if step is not None and (not self.points or self.points[-1][0] != step):
            self.points.append((step, self.monitor.last_logged["sharpness/lambda_max"]))


def make_callbacks(variant: Variant, rho: float, asam_rho: float, lr: float, flood_level: float) -> list[Callback]:
    """The only thing that differs between the runs."""
    if variant == "sam":
        return [SharpnessAwareMinimization(rho)]
    if variant == "asam":
        return [SharpnessAwareMinimization(asam_rho, adaptive=True)]
    if variant == "param_penalty":
        return [ParameterGradientPenalty(lr / 4)]
    if variant == "flooding":
        return [Flooding(flood_level)]
    return []


def final_sharpness(model: DigitsMLP, train: TensorDataset) -> float:
    """λ_max of the training loss on the whole (noisy) training set at the final parameters."""
    x, y = train.tensors
    loss = F.cross_entropy(model(x), y)
    return float(hessian_max_eigenvalue(loss, model, iterations=100, tol=1e-4,
                                        generator=torch.Generator().manual_seed(0)))


def chart(curves: dict[str, list[list[tuple[int, float]]]], two_over_lr: float, path: Path, title: str) -> Path:
    """λ_max over training, the mean over seeds per method, with the 2/η line; a log y-axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for variant, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        mean = [statistics.fmean(run[i][1] for run in runs) for i in range(min(len(r) for r in runs))]
        ax.plot(steps[: len(mean)], mean, label=LABELS[variant], linewidth=1.6, marker="o", markersize=2.5)
    ax.axhline(two_over_lr, color="black", linestyle="--", linewidth=1, label="2/η")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 2, 5, 10, 20, 50: not 5×10⁰
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("λ_max of the batch loss's Hessian")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=3, loc="lower right", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    epochs: int = 60,
    seeds: list[int] | None = None,
    variants: list[Variant] | None = None,
    noise: float = 0.4,
    hidden: int = 256,
    lr: float = 0.05,
    momentum: float = 0.9,
    batch_size: int = 64,
    rho: float = 0.05,
    asam_rho: float = 0.5,
    flood_level: float = 1.0,
    monitor_every: int = 40,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "sharpness_digits_out",
    progress_bar: bool = False,
    threads: int | None = 1,
) -> dict:
    """Train the MLP once per variant and seed on noisy labels; print, save and chart the comparison.

    Args:
        epochs: training epochs of every run (1078 noisy training digits, ``batch_size`` per step).
        seeds: one run per variant and seed (default [0, 1, 2]); the seed draws the label noise, the split and the
            initial weights, the same for every variant.
        variants: which trainings to run (default: all five).
        noise: fraction of training labels flipped to another class.
        hidden: width of the two hidden layers.
        lr: SGD learning rate η.
        momentum: SGD momentum β.
        batch_size: training batch size.
        rho: SAM's radius.
        asam_rho: ASAM's radius.
        flood_level: flooding's level b.
        monitor_every: measure λ_max every this many optimizer steps.
        logger: ``wandb`` (offline), ``csv`` or ``none``.
        out_dir: where the table, the chart and the logs go.
        progress_bar: show Lightning's progress bar.
        threads: ``torch.set_num_threads``; None leaves PyTorch's default.

    Returns:
        ``{"results": [...per run...], "table": str, "chart": path}``.
    """
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    variants = list(VARIANTS) if variants is None else list(variants)
    if threads is not None:
        torch.set_num_threads(threads)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    group = f"sharpness-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    results, curves = [], {v: [] for v in variants}
    for seed in seeds:
        train, val, test = noisy_digits(noise, seed)
        for variant in variants:
            L.seed_everything(seed, workers=True)
            model = DigitsMLP(hidden=hidden, lr=lr, momentum=momentum)
            monitor = SharpnessMonitor(every_n_steps=monitor_every, iterations=20, tol=1e-3)
            keep = SharpnessLog(monitor)
            best = ModelCheckpoint(dirpath=out / "checkpoints" / f"{variant}-seed{seed}", monitor="val/acc",
                                   mode="max", save_top_k=1)
            trainer = L.Trainer(
                max_epochs=epochs, accelerator="cpu", devices=1, deterministic=True,
                callbacks=[*make_callbacks(variant, rho, asam_rho, lr, flood_level), monitor, keep, best],
                logger=make_logger(logger, out, f"{variant}-seed{seed}", group, PROJECT, variant),
                log_every_n_steps=monitor_every, num_sanity_val_steps=0, enable_model_summary=False,
                enable_progress_bar=progress_bar, default_root_dir=str(out),
            )
            print(f"=== {LABELS[variant]}, seed {seed} ===", flush=True)
            start = time.perf_counter()
            trainer.fit(model, DataLoader(train, batch_size=batch_size, shuffle=True),
                        DataLoader(val, batch_size=512))
            seconds = time.perf_counter() - start
            sharpness = final_sharpness(model, train)
            (last,) = trainer.test(model, DataLoader(test, batch_size=512), verbose=False)  # the final weights
            (best,) = trainer.test(model, DataLoader(test, batch_size=512), ckpt_path="best", verbose=False)
            results.append({"variant": variant, "seed": seed, "test_acc": float(best["test/acc"]),
                            "final_acc": float(last["test/acc"]), "lambda_max": sharpness, "seconds": seconds})
            curves[variant].append(keep.points)
            if logger == "wandb":
                import wandb

                wandb.finish()
    table = summarize(results, variants, seeds, noise=noise, epochs=epochs, lr=lr)
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    title = f"Digits MLP, {int(noise * 100)} % noisy labels, SGD η={lr}, β={momentum}: λ_max over training"
    path = chart(curves, 2 / lr, out / "sharpness_digits.png", title)
    print(f"\nwrote {out / 'results.md'} and {path}", flush=True)
    if logger == "wandb":
        columns = ["training", "seed", "test_acc_best_val", "test_acc_final", "lambda_max", "fit_seconds"]
        rows = [[r["variant"], r["seed"], r["test_acc"], r["final_acc"], r["lambda_max"], r["seconds"]]
                for r in results]
        log_summary(PROJECT, group, out, {"lambda_max_chart": path}, (columns, rows))
    return {"results": results, "table": table, "chart": str(path)}


def summarize(results: list[dict], variants: list[Variant], seeds: list[int], *, noise: float, epochs: int,
              lr: float) -> str:
    """Markdown: test accuracy of the best-validation checkpoint and the final λ_max, mean ± sd over seeds."""
    by = {(r["variant"], r["seed"]): r for r in results}

    def cell(values: list[float], digits: int) -> str:
        sd = f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else ""
        return f"{statistics.fmean(values):.{digits}f}{sd}"

    lines = [
        f"Digits MLP, {int(noise * 100)} % of training labels flipped, {epochs} epochs, SGD η = {lr} (2/η = "
        f"{2 / lr:g}); test accuracy of the checkpoint with the best clean validation accuracy and of the final "
        f"weights; λ_max of the training loss at the end; seeds {seeds}.",
        "",
        "| training | test acc %, best val. checkpoint | test acc %, final weights | final λ_max | λ_max per seed "
        "| fit s |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for v in variants:
        acc = [100 * by[(v, s)]["test_acc"] for s in seeds]
        final = [100 * by[(v, s)]["final_acc"] for s in seeds]
        lam = [by[(v, s)]["lambda_max"] for s in seeds]
        secs = statistics.fmean(by[(v, s)]["seconds"] for s in seeds)
        lines.append(f"| {LABELS[v]} | {cell(acc, 1)} | {cell(final, 1)} | {cell(lam, 1)} | "
                     f"{', '.join(f'{x:.1f}' for x in lam)} | {secs:.1f} |")
    return "\n".join(lines)


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
