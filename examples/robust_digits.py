"""Adversarial robustness on scikit-learn's digits, measured the way papers report it.

One ordinary LightningModule (an MLP whose ``training_step`` returns the mean cross-entropy) is trained five ways,
one callback each:

- ``plain``: no callback;
- ``data_penalty``: ``DataGradientPenalty(λ)`` adds λ·mean‖∇ₓℓᵢ‖² (double backpropagation);
- ``fgsm``: ``AdversarialTraining(ε, steps=1, random_start=True)``, FGSM with a random start (Wong et al., "Fast is
  better than free"), trained on the adversarial batch only;
- ``pgd``: ``AdversarialTraining(ε, steps=10, step_size=ε/4, random_start=True)``, PGD adversarial training
  (Madry et al.);
- ``param_penalty``: ``ParameterGradientPenalty(μ)`` adds μ·‖∇θL‖² (not a robustness method; here for contrast).

Every run also carries ``RobustAccuracy`` on a validation split carved from the training digits (APGD-CE every
epoch), ``ModelCheckpoint(monitor="robust/accuracy", mode="max")`` and a plain ``ModelCheckpoint()`` for the last
weights. The best-robust checkpoint and the last one are then tested on the 450 held-out digits: clean accuracy,
PGD-20 accuracy and AutoAttack accuracy (l∞, ε = 0.1, inputs in [0, 1]). The default runs AutoAttack's two APGD
attacks ("fast"); ``--full`` runs its standard version (APGD-CE, APGD-T, FAB-T, Square) and reports how many
samples FAB-T and Square still broke.

The script prints Markdown tables (mean ± standard deviation over the seeds), writes them to
``<out_dir>/results.md``, and saves two charts: ``robust_digits.png`` (accuracies on the best-robust checkpoint)
and ``robust_curve.png`` (robust validation accuracy per epoch, where catastrophic overfitting would show), both
also logged to W&B as ``wandb.Image`` beside a ``wandb.Table`` of every run.

Run from the repository root (or ``python examples/robust_digits.py ...`` with the package installed); a
jsonargparse CLI, the parser behind LightningCLI; W&B offline by default, so no account is needed::

    python -m examples.robust_digits                    # 3 seeds, AutoAttack "fast": about 3 min on one core
    python -m examples.robust_digits --full true        # AutoAttack's standard version: about 9 min
    python -m examples.robust_digits --seeds '[0]' --epochs 10 --logger none --variants '[plain, fgsm]'
    python -m examples.robust_digits --print_config > robust.yaml   # then: --config robust.yaml
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_gp import (
    MART,
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    DataGradientPenalty,
    GradAlign,
    ParameterGradientPenalty,
    RobustAccuracy,
)
from lightning_gp.functional import robust_outcomes

try:
    from examples._digits import N_CLASSES, N_FEATURES, DigitsDataModule, log_summary, make_logger
except ImportError:  # run as a file: python examples/robust_digits.py (lightning_gp installed)
    from _digits import N_CLASSES, N_FEATURES, DigitsDataModule, log_summary, make_logger  # type: ignore[no-redef]

Variant = Literal["plain", "data_penalty", "fgsm", "pgd", "param_penalty"]
VARIANTS: tuple[Variant, ...] = ("plain", "data_penalty", "fgsm", "pgd", "param_penalty")
LABELS = {  # every training the digits examples run (robust_leaderboard.py runs more of them)
    "plain": "plain",
    "data_penalty": "data penalty",
    "fgsm": "FGSM-RS training",
    "fgsm_grad_align": "FGSM + GradAlign",
    "pgd": "PGD-10 training",
    "pgd_awp": "PGD-10 + AWP",
    "trades": "TRADES",
    "trades_awp": "TRADES + AWP",
    "mart": "MART",
    "param_penalty": "parameter penalty",
}
CHECKPOINTS = ("best", "last")
PROJECT = "lightning-gp-robust-digits"


class DigitsMLP(L.LightningModule):
    """An ordinary classifier: nothing in it knows about penalties, attacks or robust evaluation."""

    def __init__(self, hidden: int = 256, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(N_FEATURES, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, N_CLASSES),
        )
        self.val_acc = MulticlassAccuracy(N_CLASSES, average="micro")

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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def make_callbacks(variant: str, args: dict) -> list[Callback]:
    """The only thing that differs between the runs (ε = ``train_epsilon``, l∞, inputs in [0, 1]; the baselines with
    their authors' settings: 10 inner steps of ε/4, β = 6, AWP's γ = 5e-3, GradAlign beside FGSM from x)."""
    eps = args["train_epsilon"]
    pgd10 = lambda: AdversarialTraining(eps, norm="linf", steps=10, step_size=eps / 4, random_start=True,  # noqa: E731
                                        clamp=(0.0, 1.0))
    factories = {
        "plain": list,
        "data_penalty": lambda: [DataGradientPenalty(args["data_weight"], power=2)],
        "fgsm": lambda: [AdversarialTraining(eps, norm="linf", steps=1, random_start=True, clamp=(0.0, 1.0))],
        "fgsm_grad_align": lambda: [AdversarialTraining(eps, norm="linf", clamp=(0.0, 1.0)),
                                    GradAlign(args.get("grad_align_weight", 0.2), eps)],
        "pgd": lambda: [pgd10()],
        "pgd_awp": lambda: [pgd10(), AdversarialWeightPerturbation(args.get("awp_gamma", 5e-3))],
        "trades": lambda: [TRADES(eps, args.get("beta", 6.0))],
        "trades_awp": lambda: [TRADES(eps, args.get("beta", 6.0)),
                               AdversarialWeightPerturbation(args.get("awp_gamma", 5e-3))],
        "mart": lambda: [MART(eps, args.get("beta", 6.0))],
        "param_penalty": lambda: [ParameterGradientPenalty(args["param_weight"])],
    }
    return factories[variant]()


def evaluate_checkpoint(model: nn.Module, x: Tensor, y: Tensor, epsilon: float, attacks: str | list[str]) -> dict:
    """Clean, PGD-20 and AutoAttack accuracy (fractions) of ``model`` on ``(x, y)``, through the same code path
    as ``RobustAccuracy``; ``after_apgd`` is the AutoAttack accuracy after its APGD attacks alone."""
    pgd20 = robust_outcomes(model, x, y, epsilon, attacks=["pgd-20"])
    aa = robust_outcomes(model, x, y, epsilon, attacks=attacks)
    apgd = [a for a in aa.after if a.startswith("apgd")]
    after_apgd = aa.after[apgd[-1]] if apgd else aa.robust
    frac = lambda t: float(t.float().mean())  # noqa: E731
    return {"clean": frac(aa.clean), "pgd20": frac(pgd20.robust), "autoattack": frac(aa.robust),
            "after_apgd": frac(after_apgd), "broken_after_apgd": int((after_apgd & ~aa.robust).sum()),
            "seconds": sum(aa.seconds.values())}


def train_one(variant: str, seed: int, args: dict, datamodule: DigitsDataModule, out: Path, group: str,
              checkpoints: tuple[str, ...] = CHECKPOINTS, project: str = PROJECT) -> dict:
    """Fit one run with robust validation and best-robust checkpointing; test both checkpoints."""
    L.seed_everything(seed, workers=True)
    model = DigitsMLP(hidden=args["hidden"], lr=args["lr"])
    name = f"{variant}-seed{seed}"
    ckpt_dir = out / "checkpoints" / name
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # a rerun starts clean, not with last-v1.ckpt beside last.ckpt
    robust_val = RobustAccuracy(args["epsilon"], norm="linf", attacks=args["val_attacks"],
                                n_samples=args["val_samples"], seed=seed)
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best-{epoch}", monitor="robust/accuracy", mode="max")
    # the last weights from a second checkpoint without a monitor: since Lightning 2.6, `save_last=True` only
    # writes last.ckpt when a new best is saved, so it would hold the best weights, not the last ones
    last = ModelCheckpoint(dirpath=ckpt_dir, filename="last-{epoch}")
    trainer = L.Trainer(
        max_epochs=args["epochs"], accelerator=args["accelerator"], devices=1,
        callbacks=[*make_callbacks(variant, args), robust_val, best, last],
        logger=make_logger(args["logger"], out, name, group, project, variant),
        deterministic=True, num_sanity_val_steps=0, log_every_n_steps=10, enable_model_summary=False,
        enable_progress_bar=args["progress_bar"], default_root_dir=str(out),
    )
    print(f"\n=== {LABELS[variant]}, seed {seed} ===", flush=True)
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    seconds = time.perf_counter() - start
    x, y = datamodule.test_set.tensors
    if args["test_samples"] is not None:
        x, y = x[: args["test_samples"]], y[: args["test_samples"]]
    result = {"variant": variant, "seed": seed, "fit_seconds": seconds, "n_test": len(y),
              "curve": [(h["epoch"] + 1, h["robust/accuracy"]) for h in robust_val.history]}
    paths = {"best": best.best_model_path, "last": last.best_model_path}
    for which, path in ((w, paths[w]) for w in checkpoints):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(ckpt["state_dict"])
        measured = evaluate_checkpoint(model, x, y, args["epsilon"], args["attacks"])
        result[which] = {"epoch": ckpt["epoch"] + 1, **measured}
    return result


def summarize(results: list[dict], variants: list[str], seeds: list[int], *, epsilon: float,
              suite: str, checkpoints: tuple[str, ...] = CHECKPOINTS) -> tuple[str, dict]:
    """Markdown tables (mean ± sd over seeds), one per checkpoint, and the per-variant, per-checkpoint stats."""

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    sd = len(seeds) > 1  # one seed has no spread to show
    fmt = lambda p: f"{p[0]:.1f} ± {p[1]:.1f}" if sd else f"{p[0]:.1f}"  # noqa: E731
    by = {(r["variant"], r["seed"]): r for r in results}
    stats: dict[str, dict] = {}
    seeds_text = f"mean ± sd over seeds {seeds}" if sd else f"seed {seeds[0]}"
    lines = [f"Digits MLP, {results[0]['n_test']} held-out test digits; l∞ ε = {epsilon}; "
             f"AutoAttack = {suite}; {seeds_text}."]
    for which in checkpoints:
        title = "best robust-validation checkpoint" if which == "best" else "last checkpoint"
        lines += ["", f"**{title.capitalize()}**", "",
                  "| training | clean % | PGD-20 % | AutoAttack % | epoch | fit s |", "|---|---:|---:|---:|---:|---:|"]
        for v in variants:
            runs = [by[(v, s)] for s in seeds]
            row = {key: spread([100 * r[which][key] for r in runs]) for key in ("clean", "pgd20", "autoattack")}
            row["epoch"] = spread([r[which]["epoch"] for r in runs])
            row["broken_after_apgd"] = sum(r[which]["broken_after_apgd"] for r in runs)
            stats.setdefault(v, {})[which] = row
            epochs = "/".join(str(r[which]["epoch"]) for r in runs)
            fit = statistics.fmean(r["fit_seconds"] for r in runs)
            lines.append(f"| {LABELS[v]} | {fmt(row['clean'])} | {fmt(row['pgd20'])} | {fmt(row['autoattack'])} "
                         f"| {epochs} | {fit:.0f} |")
    broken = sum(stats[v][w]["broken_after_apgd"] for v in variants for w in checkpoints)
    if suite == "standard":
        lines += ["", f"FAB-T and Square broke {broken} sample(s) that APGD-CE and APGD-T left robust, over all "
                      f"{len(results) * len(checkpoints)} evaluations."]
    return "\n".join(lines), stats


def bar_chart(stats: dict, path: Path, title: str) -> Path:
    """Clean, PGD-20 and AutoAttack accuracy on the best-robust checkpoint, one group of bars per training."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside tests and on servers
    import matplotlib.pyplot as plt

    names = list(stats)
    pos = range(len(names))
    many = len(names) > 6  # labels turned, so the figure keeps a page's width and stays readable
    fig, ax = plt.subplots(figsize=(9.5, 4.8) if many else (8.5, 4.2))
    for offset, key, label in ((-0.27, "clean", "clean"), (0.0, "pgd20", "PGD-20"), (0.27, "autoattack",
                                                                                     "AutoAttack")):
        means = [stats[n]["best"][key][0] for n in names]
        errs = [stats[n]["best"][key][1] for n in names]
        bars = ax.bar([p + offset for p in pos], means, 0.27, yerr=errs if any(errs) else None, capsize=3,
                      label=label)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=7 if many else 8)
    ax.set_xticks(list(pos), [LABELS[n] for n in names], rotation=25 if many else 0, ha="right" if many else "center")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_chart(results: list[dict], variants: list[str], path: Path, title: str) -> Path:
    """Robust validation accuracy per epoch: the mean over seeds, shaded from the lowest seed to the highest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    for v in variants:
        curves = [dict(r["curve"]) for r in results if r["variant"] == v]
        epochs = sorted(set.intersection(*(set(c) for c in curves)))
        values = [[100 * c[e] for c in curves] for e in epochs]
        (line,) = ax.plot(epochs, [statistics.fmean(vs) for vs in values], label=LABELS[v])
        if len(curves) > 1:
            ax.fill_between(epochs, [min(vs) for vs in values], [max(vs) for vs in values], alpha=0.18,
                            color=line.get_color(), linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("robust validation accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    epochs: int = 30,
    seeds: list[int] | None = None,
    variants: list[Variant] | None = None,
    full: bool = False,
    hidden: int = 256,
    lr: float = 1e-3,
    batch_size: int = 64,
    epsilon: float = 0.1,
    attacks: str | list[str] | None = None,
    val_attacks: str | list[str] = "apgd-ce",
    val_size: float = 0.15,
    val_samples: int = 1000,
    test_samples: int | None = None,
    data_weight: float = 1.0,
    param_weight: float = 0.1,
    train_epsilon: float = 0.1,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "robust_digits_out",
    progress_bar: bool = True,
    accelerator: str = "cpu",
    threads: int | None = 1,
) -> dict:
    """Train the MLP once per variant and seed, choose checkpoints by robust validation, test them, report.

    Args:
        epochs: training epochs of every run.
        seeds: one run per variant and seed (default [0, 1, 2]); ``L.seed_everything(seed)`` before each, so a
            variant's runs start from the same weights and batch order as plain training with that seed.
        variants: which trainings to run (default: all five).
        full: test with AutoAttack's standard version (APGD-CE, APGD-T, FAB-T, Square) instead of "fast".
        hidden: width of the two hidden layers.
        lr: Adam learning rate.
        batch_size: training batch size.
        epsilon: l∞ radius of the evaluation (validation and test).
        attacks: the test attacks after PGD-20: "standard", "fast" or a list (default: by ``full``).
        val_attacks: the attacks of ``RobustAccuracy`` on the validation split every epoch.
        val_size: fraction of the training digits held out for validation (and checkpoint choice).
        val_samples: ``RobustAccuracy(n_samples=...)``: how many validation digits it attacks.
        test_samples: test on the first this many held-out digits (all 450 when None).
        data_weight: λ of ``DataGradientPenalty`` (λ·mean‖∇ₓℓᵢ‖²).
        param_weight: μ of ``ParameterGradientPenalty`` (μ·‖∇θL‖²).
        train_epsilon: l∞ radius of FGSM and PGD adversarial training.
        logger: ``wandb`` (offline: files under ``out_dir``, sync later with ``wandb sync``), ``csv`` or ``none``.
        out_dir: where the tables, the charts, the checkpoints and the logs go.
        progress_bar: show Lightning's progress bar.
        accelerator: passed to the Trainer ("cpu" is fastest for this tiny model).
        threads: ``torch.set_num_threads``; None leaves PyTorch's default (the matrices are too small to gain
            from intra-op parallelism).

    Returns:
        ``{"results": [...per run...], "stats": {...per variant...}, "table": str, "charts": [paths]}``.
    """
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    variants = list(VARIANTS) if variants is None else list(variants)
    attacks = ("standard" if full else "fast") if attacks is None else attacks
    suite = attacks if isinstance(attacks, str) else "+".join(attacks)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    group = f"robust-digits-{time.strftime('%Y%m%d-%H%M%S')}"
    datamodule = DigitsDataModule(batch_size=batch_size, val_size=val_size)
    datamodule.setup("fit")
    args = dict(epochs=epochs, hidden=hidden, lr=lr, epsilon=epsilon, attacks=attacks, val_attacks=val_attacks,
                val_samples=val_samples, test_samples=test_samples, data_weight=data_weight,
                param_weight=param_weight, train_epsilon=train_epsilon, logger=logger, progress_bar=progress_bar,
                accelerator=accelerator)
    began = time.perf_counter()
    results = []
    for seed in seeds:
        for variant in variants:
            results.append(train_one(variant, seed, args, datamodule, out, group))
            if logger == "wandb":
                import wandb

                wandb.finish()  # else the next WandbLogger would attach to this run

    table, stats = summarize(results, variants, seeds, epsilon=epsilon, suite=suite)
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    n = f"{len(seeds)} seed(s)"
    charts = [
        bar_chart(stats, out / "robust_digits.png",
                  f"Digits MLP, best robust-validation checkpoint, {n}: l∞ ε = {epsilon}, AutoAttack = {suite}"),
        curve_chart(results, variants, out / "robust_curve.png",
                    f"Robust validation accuracy per epoch ({val_attacks}, l∞ ε = {epsilon}), {n}"),
    ]
    print(f"\nwrote {out / 'results.md'}, {charts[0]} and {charts[1]} in {time.perf_counter() - began:.0f} s",
          flush=True)
    if logger == "wandb":
        columns = ["training", "seed", "checkpoint", "epoch", "clean_acc", "pgd20_acc", "autoattack_acc"]
        rows = [[r["variant"], r["seed"], w, r[w]["epoch"], r[w]["clean"], r[w]["pgd20"], r[w]["autoattack"]]
                for r in results for w in CHECKPOINTS]
        log_summary(PROJECT, group, out, {"accuracy_chart": charts[0], "robust_curve": charts[1]}, (columns, rows))
    if any(not math.isfinite(r[w]["clean"]) for r in results for w in CHECKPOINTS):
        raise FloatingPointError("a run ended with a non-finite accuracy")
    return {"results": results, "stats": stats, "table": table, "charts": [str(c) for c in charts]}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
