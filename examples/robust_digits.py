"""Adversarial robustness on scikit-learn's digits: one MLP, four ways to train it, one callback each.

The same LightningModule (a plain ``training_step`` returning the mean cross-entropy) is trained

- ``plain``: no callback;
- ``data_penalty``: ``DataGradientPenalty(λ)`` adds λ·mean‖∇ₓℓᵢ‖² (double backpropagation);
- ``fgsm``: ``AdversarialTraining(ε, norm="linf", random_start=True, clamp=(0, 1))``, FGSM with a random
  start (Wong et al., "Fast is better than free"), trained on the adversarial batch only;
- ``param_penalty``: ``ParameterGradientPenalty(μ)`` adds μ·‖∇θL‖² (implicit gradient regularization;
  not a robustness method, here for comparison; μ = 0.1, since IGR's γ/4 = 2.5e-4 at Adam's learning
  rate changes nothing visible),

then every model is attacked with PGD-20 (l∞, ε = 0.1, step 2.5ε/20, random start, inputs clamped to
[0, 1]) on the held-out digits. The script prints a Markdown table (mean ± standard deviation over the
seeds, and the change against ``plain`` paired by seed), writes it to ``<out_dir>/results.md``, and saves a
bar chart to ``<out_dir>/robust_digits.png``, also logged to W&B as ``wandb.Image``.

Run from the repository root (or ``python examples/robust_digits.py ...`` with the package installed);
a jsonargparse CLI, the parser behind LightningCLI; W&B offline by default, so no account is needed::

    python -m examples.robust_digits                       # one seed: about 70 s of CPU time
    python -m examples.robust_digits --seeds '[0, 1, 2]'   # the spread over three seeds
    python -m examples.robust_digits --epochs 5 --logger none --variants '[plain, fgsm]'
    python -m examples.robust_digits --print_config > robust.yaml   # then: --config robust.yaml
"""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_gp import AdversarialTraining, DataGradientPenalty, ParameterGradientPenalty
from lightning_gp.functional import pgd

try:
    from examples._digits import N_CLASSES, N_FEATURES, DigitsDataModule, log_summary, make_logger
except ImportError:  # run as a file: python examples/robust_digits.py (lightning_gp installed)
    from _digits import N_CLASSES, N_FEATURES, DigitsDataModule, log_summary, make_logger  # type: ignore[no-redef]

Variant = Literal["plain", "data_penalty", "fgsm", "param_penalty"]
VARIANTS: tuple[Variant, ...] = ("plain", "data_penalty", "fgsm", "param_penalty")
LABELS = {
    "plain": "plain",
    "data_penalty": "data penalty",
    "fgsm": "FGSM adv. training",
    "param_penalty": "parameter penalty",
}
PROJECT = "lightning-gp-robust-digits"


class DigitsMLP(L.LightningModule):
    """An ordinary classifier: nothing in it knows about penalties or attacks.

    The test loop measures clean accuracy and PGD accuracy; PGD needs input gradients, so the Trainer is
    built with ``inference_mode=False`` and ``test_step`` re-enables autograd around the attack.
    """

    def __init__(self, hidden: int = 256, lr: float = 1e-3, epsilon: float = 0.1, pgd_steps: int = 20) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )
        self.val_acc = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_clean = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_robust = MulticlassAccuracy(N_CLASSES, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        eps, steps = self.hparams.epsilon, self.hparams.pgd_steps
        with torch.enable_grad():
            x_adv = pgd(
                lambda inp: F.cross_entropy(self(inp), y, reduction="none"),
                x, epsilon=eps, norm="linf", steps=steps, step_size=2.5 * eps / steps,
                random_start=True, clamp=(0.0, 1.0),
            )
        with torch.no_grad():
            self.test_clean(self(x), y)
            self.test_robust(self(x_adv), y)
        self.log("test/clean_acc", self.test_clean)
        self.log(f"test/pgd{steps}_acc", self.test_robust)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_callbacks(variant: Variant, data_weight: float, param_weight: float, train_epsilon: float) -> list[Callback]:
    """The only thing that differs between the four runs."""
    if variant == "data_penalty":
        return [DataGradientPenalty(data_weight, power=2)]
    if variant == "fgsm":
        return [AdversarialTraining(train_epsilon, norm="linf", steps=1, random_start=True, clamp=(0.0, 1.0))]
    if variant == "param_penalty":
        return [ParameterGradientPenalty(param_weight)]
    return []


def summarize(
    results: list[dict], variants: list[Variant], seeds: list[int], *, steps: int = 20, epsilon: float = 0.1
) -> tuple[str, dict]:
    """Markdown table (mean ± sd over seeds; Δ paired by seed against plain) and the per-variant stats."""

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    by = {(r["variant"], r["seed"]): r for r in results}
    stats: dict[str, dict] = {}
    lines = [
        f"Digits MLP, test set of 450; PGD-{steps} l∞ ε = {epsilon}. "
        + (f"Mean ± sd over seeds {seeds} (Δ: paired by seed)." if len(seeds) > 1 else f"Seed {seeds[0]}."),
        "",
        f"| training | clean acc % | PGD-{steps} acc % | Δ clean vs plain | Δ PGD-{steps} vs plain | fit s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    sd = len(seeds) > 1  # one seed has no spread to show
    fmt = lambda p: f"{p[0]:.1f} ± {p[1]:.1f}" if sd else f"{p[0]:.1f}"  # noqa: E731
    signed = lambda p: (f"{p[0]:+.1f} ± {p[1]:.1f}" if sd else f"{p[0]:+.1f}") if p else ""  # noqa: E731
    for v in variants:
        clean = [100 * by[(v, s)]["clean"] for s in seeds]
        robust = [100 * by[(v, s)]["robust"] for s in seeds]
        secs = [by[(v, s)]["seconds"] for s in seeds]
        row = {"clean": spread(clean), "robust": spread(robust), "seconds": statistics.fmean(secs)}
        if "plain" in variants and v != "plain":
            base_clean = [100 * by[("plain", s)]["clean"] for s in seeds]
            base_robust = [100 * by[("plain", s)]["robust"] for s in seeds]
            row["d_clean"] = spread([a - b for a, b in zip(clean, base_clean, strict=True)])
            row["d_robust"] = spread([a - b for a, b in zip(robust, base_robust, strict=True)])
        stats[v] = row
        lines.append(
            f"| {LABELS[v]} | {fmt(row['clean'])} | {fmt(row['robust'])} | {signed(row.get('d_clean'))} "
            f"| {signed(row.get('d_robust'))} | {row['seconds']:.1f} |"
        )
    if len(seeds) > 1:
        lines += ["", f"Per seed (clean / PGD-{steps} %):", "", "| training | " + " | ".join(f"seed {s}" for s in seeds)
                  + " |", "|---|" + "---:|" * len(seeds)]
        for v in variants:
            cells = [f"{100 * by[(v, s)]['clean']:.1f} / {100 * by[(v, s)]['robust']:.1f}" for s in seeds]
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def bar_chart(stats: dict, path: Path, title: str, attack: str = "PGD-20 (l∞, ε=0.1)") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside tests and on servers
    import matplotlib.pyplot as plt

    names = list(stats)
    pos = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    for offset, key, label in ((-0.2, "clean", "clean"), (0.2, "robust", attack)):
        means = [stats[n][key][0] for n in names]
        errs = [stats[n][key][1] for n in names]
        bars = ax.bar([p + offset for p in pos], means, 0.4, yerr=errs if any(errs) else None, capsize=3,
                      label=label)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks(list(pos), [LABELS[n] for n in names])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    epochs: int = 50,
    seeds: list[int] | None = None,
    variants: list[Variant] | None = None,
    hidden: int = 256,
    lr: float = 1e-3,
    batch_size: int = 64,
    epsilon: float = 0.1,
    pgd_steps: int = 20,
    data_weight: float = 1.0,
    param_weight: float = 0.1,
    train_epsilon: float = 0.1,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "robust_digits_out",
    progress_bar: bool = True,
    accelerator: str = "cpu",
    threads: int | None = 1,
) -> dict:
    """Train the MLP once per variant and seed, attack it with PGD, print and save the comparison.

    Args:
        epochs: training epochs of every run (1347 training digits, ``batch_size`` per step).
        seeds: one run per variant and seed (default [0]); ``L.seed_everything(seed)`` before each, so a variant's
            runs start from the same initial weights and batch order as plain training with that seed.
        variants: which trainings to run (default: all four; ``plain`` is needed for the Δ columns).
        hidden: width of the two hidden layers.
        lr: Adam learning rate.
        batch_size: training batch size.
        epsilon: l∞ radius of the PGD evaluation attack.
        pgd_steps: PGD iterations of the evaluation attack (step 2.5·ε/steps, random start).
        data_weight: λ of ``DataGradientPenalty`` (λ·mean‖∇ₓℓᵢ‖²).
        param_weight: μ of ``ParameterGradientPenalty`` (μ·‖∇θL‖²).
        train_epsilon: l∞ radius of FGSM adversarial training (random start, step 1.25·ε).
        logger: ``wandb`` (offline: files under ``out_dir``, sync later with ``wandb sync``), ``csv`` or
            ``none``.
        out_dir: where the table, the chart and the logs go.
        progress_bar: show Lightning's progress bar.
        accelerator: passed to the Trainer ("cpu" is fastest for this tiny model).
        threads: ``torch.set_num_threads``; None leaves PyTorch's default. The matrices are too small to
            gain from intra-op parallelism, and on a busy machine extra threads only spin (10× slower
            measured with 2 threads on 2 shared cores).

    Returns:
        ``{"results": [...per run...], "stats": {...per variant...}, "table": str, "chart": path}``.
    """
    seeds = [0] if seeds is None else list(seeds)
    if threads is not None:
        torch.set_num_threads(threads)
    variants = list(VARIANTS) if variants is None else list(variants)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    group = f"robust-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    datamodule = DigitsDataModule(batch_size=batch_size)
    results = []
    for seed in seeds:
        for variant in variants:
            L.seed_everything(seed, workers=True)
            model = DigitsMLP(hidden=hidden, lr=lr, epsilon=epsilon, pgd_steps=pgd_steps)
            run_logger = make_logger(logger, out, f"{variant}-seed{seed}", group, PROJECT, variant)
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator=accelerator,
                devices=1,
                callbacks=make_callbacks(variant, data_weight, param_weight, train_epsilon),
                logger=run_logger,
                deterministic=True,
                inference_mode=False,  # the test loop runs PGD, which needs input gradients
                check_val_every_n_epoch=max(1, min(10, epochs)),
                num_sanity_val_steps=0,
                log_every_n_steps=10,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                default_root_dir=str(out),
            )
            print(f"\n=== {LABELS[variant]}, seed {seed} ===", flush=True)
            start = time.perf_counter()
            trainer.fit(model, datamodule=datamodule)
            seconds = time.perf_counter() - start
            (metrics,) = trainer.test(model, datamodule=datamodule, verbose=False)
            results.append({
                "variant": variant, "seed": seed, "seconds": seconds,
                "clean": float(metrics["test/clean_acc"]), "robust": float(metrics[f"test/pgd{pgd_steps}_acc"]),
            })
            if logger == "wandb":
                import wandb

                wandb.finish()  # else the next WandbLogger would attach to this run

    table, stats = summarize(results, variants, seeds, steps=pgd_steps, epsilon=epsilon)
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    title = f"Digits MLP, {epochs} epochs, {len(seeds)} seed(s): clean vs PGD-{pgd_steps} accuracy"
    chart = bar_chart(stats, out / "robust_digits.png", title, f"PGD-{pgd_steps} (l∞, ε={epsilon})")
    print(f"\nwrote {out / 'results.md'} and {chart}", flush=True)
    if logger == "wandb":
        columns = ["training", "seed", "clean_acc", "pgd_acc", "fit_seconds"]
        rows = [[r["variant"], r["seed"], r["clean"], r["robust"], r["seconds"]] for r in results]
        log_summary(PROJECT, group, out, {"accuracy_chart": chart}, (columns, rows))
    if any(not math.isfinite(r["clean"]) for r in results):
        raise FloatingPointError("a run ended with a non-finite accuracy")
    return {"results": results, "stats": stats, "table": table, "chart": str(chart)}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
