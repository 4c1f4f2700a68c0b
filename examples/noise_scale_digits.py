"""The gradient noise scale over training: which batch size the digits MLP could use.

An MLP (64→256→256→10, SGD) trains on scikit-learn's digits at two batch sizes while ``GradientNoiseScale`` logs
B_simple = tr Σ/|G|², the critical batch size of McCandlish et al. (2018), every ``monitor_every`` steps, read off the
per-sample gradient norms of the step's own backward (no extra pass). The chart (``<out_dir>/noise_scale_digits.png``)
draws the smoothed B_simple of each run over the epochs with its batch size as a dashed line: where the curve lies
above the line, a larger batch would still cut the number of steps almost in proportion; where it lies below, the
batch is already past the critical size and extra samples per step buy little. B_simple grows as the loss falls
(the gradient shrinks faster than its noise), so the batch a run can use grows over training. The script prints
the last smoothed value of each run.

Run from the repository root; a jsonargparse CLI (the parser behind LightningCLI)::

    python -m examples.noise_scale_digits                       # 3 runs, 20 epochs: about 20 s
    python -m examples.noise_scale_digits --batch_sizes '[16, 256]' --epochs 10
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import GradientNoiseScale

try:
    from examples._digits import N_CLASSES, N_FEATURES, digits_tensors
except ImportError:  # run as a file: python examples/noise_scale_digits.py (lightning_gp installed)
    from _digits import N_CLASSES, N_FEATURES, digits_tensors  # type: ignore[no-redef]


class DigitsMLP(L.LightningModule):
    """An ordinary classifier: the monitor needs nothing from it but a mean loss."""

    def __init__(self, hidden: int = 256, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, N_CLASSES))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Curve(Callback):
    """Collects (epoch, smoothed B_simple) after every measurement of the monitor."""

    def __init__(self, monitor: GradientNoiseScale) -> None:
        self.monitor, self.points, self._seen = monitor, [], None

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        step = self.monitor.last_logged_step
        if step is not None and step != self._seen and "noise_scale/b_simple_ema" in self.monitor.last_logged:
            self._seen = step
            epoch = trainer.current_epoch + (args[-1] + 1) / trainer.num_training_batches
            self.points.append((epoch, self.monitor.last_logged["noise_scale/b_simple_ema"]))


def chart(curves: dict[int, list[tuple[float, float]]], path: Path) -> Path:
    """B_simple (smoothed) over the epochs, one colour a batch size, the batch size dashed in the same colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, (batch_size, points) in zip(colors, curves.items(), strict=False):
        ax.plot([e for e, _ in points], [b for _, b in points], color=color, label=f"B_simple, batch {batch_size}")
        ax.axhline(batch_size, color=color, linestyle="--", linewidth=1, label=f"batch size {batch_size}")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("critical batch size B_simple (EMA)")
    ax.set_title("Gradient noise scale on digits: above the dashed line a larger batch still pays")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(batch_sizes: list[int] = (16, 64, 256), epochs: int = 20, hidden: int = 256, lr: float = 0.05,
         monitor_every: int = 2, ema: float = 0.95, seed: int = 0, out_dir: Path = Path("outputs/noise_scale_digits")
         ) -> dict:
    """Train one run per batch size with a ``GradientNoiseScale`` and chart its smoothed B_simple.

    Args:
        batch_sizes: one run per batch size.
        epochs: epochs per run.
        hidden: width of the MLP's two hidden layers.
        lr: SGD learning rate.
        monitor_every: measure every this many steps.
        ema: the smoothing factor of the run with the largest batch; the others smooth over as many samples.
        seed: the seed of every run.
        out_dir: where the chart goes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    x, y, _, _ = digits_tensors()
    curves: dict[int, list[tuple[float, float]]] = {}
    for batch_size in batch_sizes:
        L.seed_everything(seed, verbose=False)
        # smoothing over the same number of samples in every run: a small batch's estimate is noisier per step
        monitor = GradientNoiseScale(every_n_steps=monitor_every, ema=ema ** (batch_size / max(batch_sizes)))
        curve = Curve(monitor)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[monitor, curve], logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                            log_every_n_steps=monitor_every)
        trainer.fit(DigitsMLP(hidden, lr), DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True))
        curves[batch_size] = curve.points
        print(f"batch {batch_size}: B_simple (EMA) at the end {curve.points[-1][1]:.0f}")
    return {"curves": curves, "chart": str(chart(curves, out_dir / "noise_scale_digits.png"))}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
