"""Logging adapters of the monitors: scalars to every Lightning logger, rich media to W&B only.

Scalars go through ``Logger.log_metrics`` of each logger in ``trainer.loggers`` (CSV, TensorBoard, W&B,
...), at Lightning's own step, the way `LearningRateMonitor` logs;
Lightning loggers write from global rank 0 only. What only W&B can show — ``define_metric`` summaries,
histograms, tables, the lhs-against-rhs scatter and images — is sent only from global rank 0 and only to
`WandbLogger` s; with no W&B logger these functions do nothing, so the
monitors work unchanged with any other logger, or none.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gp._arguments import init_arguments
from lightning_gp._lightning_private import logger_prefix

#: The x-axis Lightning's WandbLogger defines for every metric; media logged here use it too.
STEP_KEY = "trainer/global_step"

#: Points drawn along lhs = rhs in the interactive scatter (W&B's built-in scatter cannot draw a line).
IDENTITY_POINTS = 25


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, Tensor | float], step: int) -> None:
    """Send ``metrics`` to every logger of the trainer at ``step`` (loggers write from rank 0 only)."""
    if not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


#: Per-sample rows a histogram or table of one measurement shows at most, drawn from all ranks alike.
MEDIA_SAMPLES = 4096


def has_wandb(trainer: pl.Trainer) -> bool:
    """Whether the trainer has a WandbLogger: the same answer on every rank (the run itself lives on rank 0)."""
    return any(isinstance(logger, WandbLogger) for logger in trainer.loggers)


def gathered_rows(trainer: pl.Trainer, rows: Tensor) -> Tensor:
    """Every rank's per-sample rows (B, K) concatenated, at most :data:`MEDIA_SAMPLES` in all (each rank sends its
    first ``MEDIA_SAMPLES // world`` rows): what the media of a measurement show, so that they describe the same
    samples as the scalars reduced over all ranks. A collective under DDP: call it on every rank."""
    world = trainer.world_size
    rows = rows.detach()[: max(1, MEDIA_SAMPLES // world)]
    if world == 1:
        return rows
    strategy = trainer.strategy
    counts = strategy.all_gather(torch.tensor([rows.shape[0]], device=rows.device)).reshape(-1)
    largest = int(counts.max())
    padded = torch.zeros(largest, *rows.shape[1:], dtype=rows.dtype, device=rows.device)
    padded[: rows.shape[0]] = rows
    gathered = strategy.all_gather(padded)  # (world, largest, K)
    return torch.cat([gathered[r, : int(counts[r])] for r in range(world)])


def wandb_runs(trainer: pl.Trainer) -> list[Any]:
    """The ``wandb`` runs of the trainer's WandbLoggers, on global rank 0; ``[]`` everywhere else."""
    return [run for run, _ in _wandb_targets(trainer)]


def _wandb_targets(trainer: pl.Trainer) -> list[tuple[Any, Callable[[str], str]]]:
    """``(run, key)`` for each WandbLogger of the trainer, on global rank 0: ``key(name)`` is ``name`` under the
    logger's ``prefix`` (``exp-grad_norm/input``), as Lightning writes the scalars, so media and summaries land
    in the same section as them."""
    if not trainer.is_global_zero:
        return []
    targets = []
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            prefix = logger_prefix(logger)
            join = getattr(logger, "LOGGER_JOIN_CHAR", "-")
            targets.append((logger.experiment, (lambda name, p=prefix, j=join: f"{p}{j}{name}" if p else name)))
    return targets


def define_summaries(trainer: pl.Trainer, summaries: Mapping[str, str]) -> None:
    """``run.define_metric(key, summary=...)`` for each ``{key: "max" | "min" | "mean"}``: the run's summary keeps
    that aggregate (the largest MLP-inequality ratio of the run) and the last value, under the logger's prefix.
    The step axis stays Lightning's ``trainer/global_step``.
    """
    for run, key in _wandb_targets(trainer):
        for name, summary in summaries.items():
            run.define_metric(key(name), summary=summary if summary == "last" else f"{summary},last",
                              step_metric=STEP_KEY)


def log_settings(trainer: pl.Trainer, owner: Any) -> None:
    """Put ``owner``'s constructor settings into every logger's hyperparameters, under ``lightning_gp/<its key>``
    (W&B's run config, TensorBoard's hparams, CSV's ``hparams.yaml``), so runs can be filtered and grouped by
    penalty weight, ε or method. Values other than numbers, strings, booleans and None are written as ``repr``."""
    if not trainer.loggers:
        return
    settings = {name: value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
                for name, value in init_arguments(owner).items()}
    key = getattr(owner, "state_key", type(owner).__qualname__)
    for logger in trainer.loggers:
        logger.log_hyperparams({f"lightning_gp/{key}": settings})


def log_histograms(trainer: pl.Trainer, values: Mapping[str, Tensor], step: int) -> None:
    """A ``wandb.Histogram`` of each 1-d tensor of values (the monitors pass every rank's samples), one row."""
    targets = _wandb_targets(trainer)
    if not targets or not values:
        return
    import wandb

    histograms = {k: wandb.Histogram(_numpy(v)) for k, v in values.items()}
    for run, key in targets:
        run.log({**{key(k): h for k, h in histograms.items()}, STEP_KEY: step})


def log_scatter(trainer: pl.Trainer, key: str, columns: tuple[str, str], rows: Tensor, step: int, *,
                title: str) -> None:
    """A per-sample table (step, sample, the two columns) and W&B's scatter chart of its second column against
    its first, under ``key``; the step column lets the table be filtered or coloured by step."""
    targets = _wandb_targets(trainer)
    if not targets:
        return
    import wandb

    a, b = _numpy(rows[:, 0]), _numpy(rows[:, 1])
    table = wandb.Table(columns=["step", "sample", *columns],
                        data=[[step, i, float(x), float(y)] for i, (x, y) in enumerate(zip(a, b, strict=True))])
    for run, name in targets:
        run.log({name(key): wandb.plot.scatter(table, columns[0], columns[1], title=f"{title}, step {step}"),
                 STEP_KEY: step})


def log_inequality(trainer: pl.Trainer, prefix: str, lhs: Tensor, rhs: Tensor, ratio: Tensor, step: int) -> None:
    """Per-sample MLP-inequality values as a W&B table, a scatter of lhs against rhs, and a PNG image.

    - ``<prefix>/samples``: table with columns step, sample, lhs, rhs, ratio.
    - ``<prefix>/lhs_vs_rhs``: W&B's interactive scatter; W&B's built-in chart cannot draw a line, so its
      table carries, besides the samples (``kind="sample"``), points along lhs = rhs (``kind="lhs = rhs"``):
      every sample must lie on or below them.
    - ``<prefix>/lhs_vs_rhs_image``: the same on log-log axes with the line drawn (needs matplotlib; skipped
      with a warning when it is missing).
    """
    targets = _wandb_targets(trainer)
    if not targets:
        return
    import wandb

    lhs, rhs, ratio = _numpy(lhs), _numpy(rhs), _numpy(ratio)
    samples = wandb.Table(
        columns=["step", "sample", "lhs", "rhs", "ratio"],
        data=[[step, i, float(a), float(b), float(r)] for i, (a, b, r) in enumerate(zip(lhs, rhs, ratio, strict=True))],
    )
    top = float(max(lhs.max(initial=0.0), rhs.max(initial=0.0)))
    line = [[top * k / (IDENTITY_POINTS - 1)] * 2 + ["lhs = rhs"] for k in range(IDENTITY_POINTS)]
    points = [[float(b), float(a), "sample"] for a, b in zip(lhs, rhs, strict=True)]
    scatter_table = wandb.Table(columns=["rhs", "lhs", "kind"], data=points + line)
    row: dict[str, Any] = {
        f"{prefix}/samples": samples,
        f"{prefix}/ratio": wandb.Histogram(ratio),
        f"{prefix}/lhs_vs_rhs": wandb.plot.scatter(
            scatter_table, "rhs", "lhs", title=f"MLP inequality at step {step}: lhs ≤ rhs"
        ),
        STEP_KEY: step,
    }
    image = _scatter_png(lhs, rhs, step)
    if image is not None:
        row[f"{prefix}/lhs_vs_rhs_image"] = wandb.Image(image, caption=f"step {step}")
    for run, key in targets:
        run.log({(k if k == STEP_KEY else key(k)): v for k, v in row.items()})


def _numpy(t: Tensor | Sequence[float]):
    return torch.as_tensor(t).detach().to("cpu", torch.float64).numpy()


_warned_matplotlib = False


def _scatter_png(lhs, rhs, step: int):
    """A PIL image of lhs against rhs on log-log axes with the line lhs = rhs, or None without matplotlib."""
    global _warned_matplotlib
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import LogLocator, NullFormatter
        from PIL import Image
    except ImportError:
        if not _warned_matplotlib:
            rank_zero_warn("matplotlib is not installed: the lhs-against-rhs image is not logged to W&B.")
            _warned_matplotlib = True
        return None
    # A Figure without pyplot: no global backend state, safe in any thread or headless process.
    fig = Figure(figsize=(4.2, 4.0), dpi=100)
    ax = fig.add_subplot()
    keep = (lhs > 0) & (rhs > 0)  # log axes; a zero-gradient sample has lhs = rhs = 0 and sits on the line
    ax.scatter(rhs[keep], lhs[keep], s=10, alpha=0.7, label="samples")
    if keep.any():
        lo = min(lhs[keep].min(), rhs[keep].min())
        hi = max(lhs[keep].max(), rhs[keep].max())
        ax.plot([lo, hi], [lo, hi], color="black", lw=1, label="lhs = rhs")
    ax.set(xscale="log", yscale="log", xlabel="rhs = ‖∇θf‖²", ylabel="lhs", title=f"MLP inequality, step {step}")
    for axis in (ax.xaxis, ax.yaxis):  # decades only, no minor labels: they overlapped on short ranges
        axis.set_major_locator(LogLocator(numticks=6))
        axis.set_minor_formatter(NullFormatter())
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    return Image.open(buf)
