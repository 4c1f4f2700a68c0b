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
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gp._lightning.arguments import init_arguments
from lightning_gp._lightning.private import logger_prefix

#: The x-axis Lightning's WandbLogger defines for every metric; media logged here use it too.
STEP_KEY = "trainer/global_step"

#: Per run and key, the W&B table that accumulates the measurements' rows (``log_mode="INCREMENTAL"``) and how many
#: measurements were offered to it.
_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Measurements an accumulated table takes in full; after them, a log-spaced selection (see :func:`_accumulated`).
ACCUMULATED_IN_FULL = 32


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


def prefixed(name: str, prefix: str, join: str = "-") -> str:
    """``name`` under a logger's ``prefix`` as Lightning writes the scalars (``exp-grad_norm/input``; ``join`` is the
    logger's ``LOGGER_JOIN_CHAR``), or ``name`` itself without a prefix.

    Example:

        >>> prefixed("grad_norm/input", "exp"), prefixed("grad_norm/input", "")
        ('exp-grad_norm/input', 'grad_norm/input')
    """
    return f"{prefix}{join}{name}" if prefix else name


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
            targets.append((logger.experiment, (lambda name, p=prefix, j=join: prefixed(name, p, j))))
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
    penalty weight, ε or method. The key is :func:`config_key`, the values :func:`config_value`: both the same in two
    identical runs."""
    if not trainer.loggers:
        return
    settings = {name: config_value(value) for name, value in init_arguments(owner).items()}
    for logger in trainer.loggers:
        logger.log_hyperparams({f"lightning_gp/{config_key(trainer, owner)}": settings})


def config_key(trainer: pl.Trainer, owner: Any) -> str:
    """``owner``'s class name, with a short disambiguator where the Trainer holds two of its class: what tells them
    apart (``target=...``, ``power=1``), or else its position among them.

    Example:

        >>> class Dummy:
        ...     callbacks = []
        >>> config_key(Dummy(), object())
        'object'
    """
    name = type(owner).__qualname__
    same = [cb for cb in getattr(trainer, "callbacks", []) if type(cb) is type(owner)]
    if len(same) <= 1:
        return name
    fields = owner.state_key_fields() if hasattr(owner, "state_key_fields") else {}
    tag = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={config_value(v)}" for k, v in fields.items())
    return f"{name}[{tag or same.index(owner)}]"


def config_value(value: Any) -> Any:
    """A value a run config can group by: numbers, strings, booleans and None as they are; a list of them as a list;
    a module by its class; a function by its qualified name (never its address, which changes every run); other
    objects by ``repr``, or by their class where the ``repr`` holds an address.

    Example:

        >>> config_value((0.0, 1.0)), config_value(torch.nn.Linear(2, 2)), config_value(math.sqrt)
        ([0.0, 1.0], 'Linear', 'math.sqrt')
    """
    simple = (int, float, str, bool, type(None))
    if isinstance(value, simple):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, simple) for v in value):
        return list(value)
    if isinstance(value, torch.nn.Module):
        return type(value).__qualname__
    if callable(value) and hasattr(value, "__qualname__"):
        module = getattr(value, "__module__", None)
        return f"{module}.{value.__qualname__}" if module else value.__qualname__
    text = repr(value)
    return type(value).__qualname__ if " at 0x" in text else text


def log_histograms(trainer: pl.Trainer, values: Mapping[str, Tensor], step: int) -> None:
    """A ``wandb.Histogram`` of each 1-d tensor of values (the monitors pass every rank's samples), one row."""
    targets = _wandb_targets(trainer)
    if not targets or not values:
        return
    import wandb

    histograms = {k: wandb.Histogram(_numpy(v)) for k, v in values.items()}
    for run, key in targets:
        run.log({**{key(k): h for k, h in histograms.items()}, STEP_KEY: step})


def _thinned_out(offered: int) -> bool:
    """Whether the ``offered``-th measurement (from 1) is left out of an accumulated table: the first
    :data:`ACCUMULATED_IN_FULL` go in, then every 2nd up to twice as many, every 4th up to four times as many, ...

    W&B writes the list of all earlier increments with each new one, so a table of n increments costs O(n²) of
    history; log-spaced increments keep a run of 100 000 measurements at 216, spread over the whole run.

    Example:

        >>> [n for n in range(30, 75) if not _thinned_out(n)]
        [30, 31, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 64, 68, 72]
    """
    if offered <= ACCUMULATED_IN_FULL:
        return False
    stride = 2 ** math.ceil(math.log2(offered / ACCUMULATED_IN_FULL))
    return offered % stride != 0


def _accumulated(run: Any, key: str, columns: list[str], rows: list[list]) -> Any:
    """The run's table under ``key`` with ``rows`` appended, or None when this measurement is thinned out
    (:func:`_thinned_out`): one ``wandb.Table(log_mode="INCREMENTAL")`` per run and key, so each log writes only the
    new rows and W&B shows the measurements together (a step column to filter or colour by; incremental tables
    need W&B server 0.70 or later)."""
    import wandb

    tables = _TABLES.setdefault(run, {})
    table, offered = tables.get(key, (None, 0))
    offered += 1
    if table is None:
        table = wandb.Table(columns=columns, log_mode="INCREMENTAL")
    tables[key] = (table, offered)
    if _thinned_out(offered):
        return None
    for row in rows:
        table.add_data(*row)
    return table


def log_scatter(trainer: pl.Trainer, key: str, columns: tuple[str, str], rows: Tensor, step: int, *,
                title: str) -> None:
    """W&B's scatter chart of the second column against the first under ``key``, over a per-sample table (step,
    sample, the two columns) that accumulates every measurement (:func:`_accumulated`): one chart of all steps,
    to be coloured or filtered by step."""
    targets = _wandb_targets(trainer)
    if not targets:
        return
    import wandb

    a, b = _numpy(rows[:, 0]), _numpy(rows[:, 1])
    new = [[step, i, float(x), float(y)] for i, (x, y) in enumerate(zip(a, b, strict=True))]
    for run, name in targets:
        table = _accumulated(run, name(key), ["step", "sample", *columns], new)
        if table is not None:
            run.log({name(key): wandb.plot.scatter(table, columns[0], columns[1], title=f"{title}, over training"),
                     STEP_KEY: step})


def log_inequality(trainer: pl.Trainer, prefix: str, lhs: Tensor, rhs: Tensor, ratio: Tensor, step: int) -> None:
    """Per-sample MLP-inequality values as W&B media.

    - ``<prefix>/lhs_vs_rhs``: W&B's scatter of lhs against rhs over a per-sample table (step, sample, lhs, rhs,
      ratio; ``<prefix>/lhs_vs_rhs_table``) that accumulates the measurements (:func:`_accumulated`), to be
      coloured by step.
    - ``<prefix>/ratio_sorted``: a line chart of this measurement's lhs/rhs in increasing order against the
      fraction of samples, with the bound lhs = rhs drawn as the line at 1 (W&B's built-in scatter draws no line).
    - ``<prefix>/lhs_vs_rhs_image``: the scatter on log-log axes with the line lhs = rhs drawn, as a PNG (needs
      matplotlib; skipped with a warning when it is missing).
    """
    targets = _wandb_targets(trainer)
    if not targets:
        return
    import wandb

    lhs, rhs, ratio = _numpy(lhs), _numpy(rhs), _numpy(ratio)
    new = [[step, i, float(a), float(b), float(r)] for i, (a, b, r) in enumerate(zip(lhs, rhs, ratio, strict=True))]
    ordered = sorted(float(r) for r in ratio)
    n = max(len(ordered), 1)
    fractions = [(k + 0.5) / n for k in range(len(ordered))]
    sorted_chart = wandb.plot.line_series(
        xs=[fractions, [0.0, 1.0]], ys=[ordered, [1.0, 1.0]], keys=["lhs / rhs, sorted", "bound: lhs = rhs"],
        title=f"MLP inequality at step {step}: every sample on or below the bound", xname="fraction of samples")
    image = _scatter_png(lhs, rhs, step)
    for run, key in targets:
        table = _accumulated(run, key(f"{prefix}/lhs_vs_rhs"), ["step", "sample", "lhs", "rhs", "ratio"], new)
        row: dict[str, Any] = {
            key(f"{prefix}/ratio"): wandb.Histogram(ratio),
            key(f"{prefix}/ratio_sorted"): sorted_chart,
            STEP_KEY: step,
        }
        if table is not None:
            row[key(f"{prefix}/lhs_vs_rhs")] = wandb.plot.scatter(table, "rhs", "lhs",
                                                                  title="MLP inequality over training: lhs ≤ rhs")
        if image is not None:
            row[key(f"{prefix}/lhs_vs_rhs_image")] = wandb.Image(image, caption=f"step {step}")
        run.log(row)


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


def log_table(trainer: pl.Trainer, key: str, columns: list[str], rows: list[list]) -> None:
    """A W&B table (rank 0, every W&B logger), e.g. a summary at the end of fit; nothing without W&B."""
    if not has_wandb(trainer) or not trainer.is_global_zero:
        return
    import wandb

    for run, name in _wandb_targets(trainer):
        run.log({name(key): wandb.Table(columns=columns, data=rows)})
