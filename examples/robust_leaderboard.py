"""A small robust-training leaderboard on scikit-learn's digits: the baselines robust-training papers compare against.

One ordinary LightningModule (the MLP of ``robust_digits.py``) trained nine ways, one or two callbacks each, every run
with ``RobustAccuracy`` on a validation split and ``ModelCheckpoint(monitor="robust/accuracy", mode="max")``:

- ``plain``; ``data_penalty``: ``DataGradientPenalty(1.0)``;
- ``fgsm``: FGSM with a random start; ``fgsm_grad_align``: FGSM from x + ``GradAlign(0.2, ε)``;
- ``pgd``: PGD-10 adversarial training; ``pgd_awp``: the same + ``AdversarialWeightPerturbation(5e-3)``;
- ``trades``: ``TRADES(ε, beta=6)``; ``trades_awp``: the same + AWP; ``mart``: ``MART(ε, beta=6)``.

Each best-robust checkpoint is tested on the 450 held-out digits: clean, PGD-20 and AutoAttack accuracy (l∞,
ε = 0.1), mean ± sd over the seeds. A second part trains FGSM, FGSM + GradAlign and PGD-10 at a large ε
(``co_epsilon``) and draws their robust validation accuracy per epoch, where FGSM's catastrophic overfitting would
show. The script prints the table, writes ``results.md``, ``leaderboard.png``, ``leaderboard_curves.png`` and
``catastrophic_overfitting.png`` under ``out_dir``, and logs them to W&B (offline) with a table of every run.

Run from the repository root (``pip install --no-deps torchattacks`` first)::

    python -m examples.robust_leaderboard                  # 3 seeds, AutoAttack "fast": about 9 min on one core
    python -m examples.robust_leaderboard --full true      # AutoAttack's standard version
    python -m examples.robust_leaderboard --seeds '[0]' --variants '[plain, trades, mart]' --logger none
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Literal

import torch

try:
    from examples import robust_digits as rd
    from examples._digits import DigitsDataModule, log_summary
except ImportError:  # run as a file (lightning_gp installed)
    import robust_digits as rd  # type: ignore[no-redef]
    from _digits import DigitsDataModule, log_summary  # type: ignore[no-redef]

Method = Literal["plain", "data_penalty", "fgsm", "fgsm_grad_align", "pgd", "pgd_awp", "trades", "trades_awp", "mart"]
METHODS: tuple[Method, ...] = ("plain", "fgsm", "fgsm_grad_align", "pgd", "trades", "mart", "pgd_awp", "trades_awp",
                               "data_penalty")
CO_METHODS: tuple[Method, ...] = ("fgsm", "fgsm_grad_align", "pgd")
PROJECT = "lightning-gp-robust-leaderboard"


def main(
    epochs: int = 30,
    seeds: list[int] | None = None,
    variants: list[Method] | None = None,
    full: bool = False,
    epsilon: float = 0.1,
    co_epsilon: float = 0.2,
    co_epochs: int = 30,
    co: bool = True,
    attacks: str | list[str] | None = None,
    val_attacks: str | list[str] = "pgd-20",
    val_size: float = 0.15,
    val_samples: int = 1000,
    test_samples: int | None = None,
    hidden: int = 256,
    lr: float = 1e-3,
    batch_size: int = 64,
    beta: float = 6.0,
    awp_gamma: float = 5e-3,
    grad_align_weight: float = 0.2,
    data_weight: float = 1.0,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "robust_leaderboard_out",
    progress_bar: bool = False,
    threads: int | None = 1,
) -> dict:
    """Train every method on every seed, test its best robust checkpoint, and draw the curves.

    Args:
        epochs: training epochs of the leaderboard runs.
        seeds: seeds of every method (default [0, 1, 2]).
        variants: the methods (default: all nine).
        full: test with AutoAttack's standard version instead of its two APGD attacks.
        epsilon: l∞ radius of training and evaluation.
        co_epsilon: the large radius of the catastrophic-overfitting part.
        co_epochs: its training epochs.
        co: run that part.
        attacks: the test attacks after PGD-20 (default by ``full``).
        val_attacks: ``RobustAccuracy``'s attacks every epoch (PGD-20: the checkpoint choice, cheap).
        val_size: fraction of the training digits held out for validation.
        val_samples: how many validation digits ``RobustAccuracy`` attacks.
        test_samples: test on the first this many held-out digits (all 450 when None).
        hidden: the MLP's width.
        lr: Adam's learning rate.
        batch_size: training batch size.
        beta: TRADES's and MART's β.
        awp_gamma: AWP's γ.
        grad_align_weight: GradAlign's λ.
        data_weight: the data penalty's λ.
        logger: ``wandb`` (offline), ``csv`` or ``none``.
        out_dir: where the tables, charts, checkpoints and logs go.
        progress_bar: Lightning's progress bar.
        threads: ``torch.set_num_threads`` (None: PyTorch's default).

    Returns:
        ``{"results": [...], "stats": {...}, "co_results": [...], "table": str, "charts": [paths]}``.
    """
    seeds = [0, 1, 2] if seeds is None else list(seeds)
    variants = list(METHODS) if variants is None else list(variants)
    attacks = ("standard" if full else "fast") if attacks is None else attacks
    suite = attacks if isinstance(attacks, str) else "+".join(attacks)
    if threads is not None:
        torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    group = f"robust-leaderboard-{time.strftime('%Y%m%d-%H%M%S')}"
    datamodule = DigitsDataModule(batch_size=batch_size, val_size=val_size)
    datamodule.setup("fit")
    args = dict(epochs=epochs, hidden=hidden, lr=lr, epsilon=epsilon, attacks=attacks, val_attacks=val_attacks,
                val_samples=val_samples, test_samples=test_samples, data_weight=data_weight, param_weight=0.0,
                train_epsilon=epsilon, beta=beta, awp_gamma=awp_gamma, grad_align_weight=grad_align_weight,
                logger=logger, progress_bar=progress_bar, accelerator="cpu")
    began = time.perf_counter()

    def run(variant: str, seed: int, run_args: dict, where: Path) -> dict:
        result = rd.train_one(variant, seed, run_args, datamodule, where, group, checkpoints=("best",),
                              project=PROJECT)
        if logger == "wandb":
            import wandb

            wandb.finish()
        return result

    results = [run(v, seed, args, out) for seed in seeds for v in variants]
    table, stats = rd.summarize(results, variants, seeds, epsilon=epsilon, suite=suite, checkpoints=("best",))
    n = f"{len(seeds)} seed(s)"
    title = f"Digits MLP, best robust-validation checkpoint, {n}: l∞ ε = {epsilon}, AutoAttack = {suite}"
    charts = [rd.bar_chart(stats, out / "leaderboard.png", title),
              rd.curve_chart(results, variants, out / "leaderboard_curves.png",
                             f"Robust validation accuracy per epoch ({val_attacks}, l∞ ε = {epsilon}), {n}")]
    co_results: list[dict] = []
    if co:
        co_args = dict(args, epochs=co_epochs, epsilon=co_epsilon, train_epsilon=co_epsilon, attacks=["pgd-20"])
        co_results = [run(v, seed, co_args, out / "co") for seed in seeds for v in CO_METHODS]
        charts.append(rd.curve_chart(co_results, list(CO_METHODS), out / "catastrophic_overfitting.png",
                                     f"At a large radius: robust validation accuracy per epoch ({val_attacks}, l∞ "
                                     f"ε = {co_epsilon}), {n}"))
        final = {v: [r["curve"][-1][1] for r in co_results if r["variant"] == v] for v in CO_METHODS}
        peak = {v: [max(c for _, c in r["curve"]) for r in co_results if r["variant"] == v] for v in CO_METHODS}
        table += "\n\nAt ε = {:g} (robust validation accuracy, mean over seeds: peak → last epoch): {}.".format(
            co_epsilon, "; ".join(f"{rd.LABELS[v]} {100 * sum(peak[v]) / len(peak[v]):.1f} → "
                                  f"{100 * sum(final[v]) / len(final[v]):.1f} %" for v in CO_METHODS))
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    print(f"\nwrote {out / 'results.md'} and {', '.join(str(c) for c in charts)} in "
          f"{time.perf_counter() - began:.0f} s", flush=True)
    if logger == "wandb":
        columns = ["training", "seed", "epoch", "clean_acc", "pgd20_acc", "autoattack_acc"]
        rows = [[r["variant"], r["seed"], r["best"]["epoch"], r["best"]["clean"], r["best"]["pgd20"],
                 r["best"]["autoattack"]] for r in results]
        log_summary(PROJECT, group, out, {c.stem: c for c in charts}, (columns, rows))
    return {"results": results, "stats": stats, "co_results": co_results, "table": table,
            "charts": [str(c) for c in charts]}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
