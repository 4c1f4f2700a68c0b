"""scikit-learn's bundled 8×8 digits as tensors and as a LightningDataModule (no download), and the run
logging the digits examples share (a logger per run, one W&B summary run).

Inputs are flattened to 64 features and scaled from [0, 16] to [0, 1], so an l∞ attack of radius ε and
``clamp=(0, 1)`` mean the same thing as on image benchmarks. The train/test split is stratified and fixed
by ``split_seed``: every run (and every example that imports this module) sees the same test set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

N_FEATURES = 64
N_CLASSES = 10


def digits_tensors(
    *, test_size: float = 0.25, split_seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: inputs (N, 64) in [0, 1], integer labels (N,).

    Example::

        >>> x_train, y_train, x_test, y_test = digits_tensors()
        >>> x_train.shape, x_test.shape, float(x_train.min()), float(x_train.max())
        (torch.Size([1347, 64]), torch.Size([450, 64]), 0.0, 1.0)
    """
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_size, random_state=split_seed, stratify=data.target
    )
    # The pixel values are integer counts 0..16 (4×4 blocks of a 32×32 bitmap).
    to_x = lambda a: torch.as_tensor(a / 16.0, dtype=dtype)  # noqa: E731
    to_y = lambda a: torch.as_tensor(a, dtype=torch.long)  # noqa: E731
    return to_x(x_tr), to_y(y_tr), to_x(x_te), to_y(y_te)


class SplitLoaders:
    """The loaders of a data module holding ``train_set``/``test_set`` (and maybe ``val_set``): shuffled training
    batches of ``batch_size``; for validation the ``val_set`` where there is one, else the test set."""

    train_set: Any
    test_set: Any
    val_set: Any = None
    batch_size: int
    eval_batch_size: int

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        held_out = self.val_set if self.val_set is not None else self.test_set
        return DataLoader(held_out, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)


class DigitsDataModule(SplitLoaders, L.LightningDataModule):
    """The digits split as ``(x, y)`` batches: shuffled training batches, a validation split, the test set.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of validation and test loaders (the whole test set by default).
        test_size: fraction of the 1797 digits held out for testing.
        split_seed: seed of the stratified splits (kept fixed so test accuracies are comparable).
        val_size: fraction of the training digits held out for validation (stratified), so that a checkpoint
            can be chosen without looking at the test set; 0 validates on the test set.
    """

    def __init__(
        self, batch_size: int = 64, eval_batch_size: int = 512, test_size: float = 0.25, split_seed: int = 0,
        val_size: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.test_size = test_size
        self.split_seed = split_seed
        self.val_size = val_size
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x_tr, y_tr, x_te, y_te = digits_tensors(test_size=self.test_size, split_seed=self.split_seed)
            if self.val_size > 0:
                x_tr, x_va, y_tr, y_va = train_test_split(x_tr, y_tr, test_size=self.val_size,
                                                          random_state=self.split_seed, stratify=y_tr)
                self.val_set = TensorDataset(x_va, y_va)
            self.train_set, self.test_set = TensorDataset(x_tr, y_tr), TensorDataset(x_te, y_te)


def make_logger(kind: str, out_dir: Path, name: str, group: str, project: str, variant: str | None = None):
    """A W&B logger (offline) or a CSV logger for one run, or False for ``kind="none"``.

    W&B draws the runs of one group as one line (their mean), so each ``variant`` gets its own group
    (``<group>-<variant>``): its seeds average together, and the variants draw as separate lines.
    """
    if kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        wandb_group = f"{group}-{variant}" if variant else group
        return WandbLogger(project=project, name=name, group=wandb_group, offline=True, save_dir=str(out_dir))
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(str(out_dir), name=group, version=name)
    return False


def log_summary(project: str, group: str, out_dir: Path, images: dict[str, Path],
                table: tuple[list[str], list[list]] | None = None) -> None:
    """One offline W&B run named "summary" with the example's charts (``wandb.Image``) and results table."""
    import wandb

    run = wandb.init(project=project, name="summary", group=group, dir=str(out_dir), mode="offline",
                     job_type="summary")
    row: dict[str, Any] = {key: wandb.Image(str(path)) for key, path in images.items()}
    if table is not None:
        row["results"] = wandb.Table(columns=table[0], data=table[1])
    run.log(row)
    run.finish()
