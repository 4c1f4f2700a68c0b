"""RobustAccuracy in a Trainer: what it logs, the samples it attacks, checkpoints by it, training untouched, DDP."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import RobustAccuracy
from lightning_gp.functional.robust import robust_outcomes
from tests.ddp import run_ddp_script

pytest.importorskip("torchattacks")

QUIET = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
             deterministic=True)
ATTACKS = ["pgd-20", "apgd-ce"]


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 8, generator=g)
    y = (x[:, :4].argmax(1) + (x[:, 4] > 0.9).long()) % 4
    return TensorDataset(x, y)


def loaders(batch_size=16):
    return DataLoader(data(), batch_size=batch_size, shuffle=True), DataLoader(data(48, seed=1), batch_size=batch_size)


def fit(callbacks, epochs=4, seed=0, **kwargs):
    pl.seed_everything(seed, verbose=False)
    model = Net(dropout=0.2)
    trainer = pl.Trainer(max_epochs=epochs, callbacks=callbacks, **QUIET | {"enable_checkpointing": False} | kwargs)
    trainer.fit(model, *loaders())
    return trainer, model


def test_it_logs_every_n_epochs_what_the_functional_computes_on_the_first_n_samples():
    cb = RobustAccuracy(0.1, attacks=ATTACKS, n_samples=40, every_n_epochs=2)
    trainer, model = fit([cb])
    assert [h["epoch"] for h in cb.history] == [1, 3]
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("robust/")}
    assert set(logged) == {"robust/clean_accuracy", "robust/accuracy", "robust/accuracy/pgd-20",
                           "robust/accuracy/apgd-ce"}
    x, y = data(48, seed=1).tensors
    out = robust_outcomes(model, x[:40], y[:40], 0.1, attacks=ATTACKS)  # the same samples, seed and attacks
    assert logged["robust/clean_accuracy"] == pytest.approx(float(out.clean.float().mean()))
    assert logged["robust/accuracy"] == pytest.approx(float(out.robust.float().mean()))
    assert logged["robust/accuracy/pgd-20"] == pytest.approx(float(out.after["pgd-20"].float().mean()))
    assert logged["robust/accuracy"] < logged["robust/clean_accuracy"]  # the attacks did something
    result = pl.Trainer(callbacks=[cb], **QUIET).validate(model, loaders()[1], verbose=False)[0]
    assert result["robust/accuracy"] == pytest.approx(logged["robust/accuracy"])


def test_training_with_the_evaluation_is_bit_identical_to_training_without_it():
    """Eval mode, the RNG (dropout masks, shuffling), BatchNorm statistics, .grad: all as if it never ran."""
    _, with_cb = fit([RobustAccuracy(0.1, attacks=ATTACKS, n_samples=32)])
    _, without = fit([])
    for (k, a), b in zip(with_cb.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_model_checkpoint_keeps_the_best_robust_epoch(tmp_path):
    cb = RobustAccuracy(0.15, attacks=ATTACKS, n_samples=48)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="robust/accuracy", mode="max", filename="{epoch}")
    fit([cb, ckpt], epochs=5, enable_checkpointing=True)
    best = max(cb.history, key=lambda h: h["robust/accuracy"])  # the first best, as ModelCheckpoint keeps it
    assert float(ckpt.best_model_score) == pytest.approx(best["robust/accuracy"])
    assert ckpt.best_model_path.endswith(f"epoch={best['epoch']}.ckpt")
    state = torch.load(ckpt.best_model_path, weights_only=False)
    assert any("RobustAccuracy" in k for k in state["callbacks"])  # its history is checkpointed


def test_a_loader_without_labels_and_a_missing_validation_loader_are_refused():
    class NoLabels(Net):
        def validation_step(self, batch, batch_idx):
            pass

    cb = RobustAccuracy(0.1, attacks=ATTACKS)
    unlabeled = DataLoader(data().tensors[0], batch_size=16)
    with pytest.raises(ValueError, match=r"needs integer class labels.*Pass `target_key=`"):
        pl.Trainer(max_epochs=1, callbacks=[cb], **QUIET).fit(NoLabels(), loaders()[0], unlabeled)
    with pytest.raises(ValueError, match=r"must lie inside `bounds` = \(0.0, 0.5\)"):
        pl.Trainer(max_epochs=1, callbacks=[RobustAccuracy(0.1, attacks=ATTACKS, bounds=(0.0, 0.5))],
                   **QUIET).fit(Net(), *loaders())


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(eps=-0.1), r"RobustAccuracy\(eps=-0.1\): `eps` must be a positive number, got -0.1"),
    (dict(eps=0.1, attacks=["squares"]), r"unknown attack 'squares'.*Did you mean 'square'"),
    (dict(eps=0.1, n_samples=0), r"n_samples"),
    (dict(eps=0.1, every_n_epochs=0), r"every_n_epochs"),
    (dict(eps=0.1, bounds=None), r"`bounds=None`"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RobustAccuracy(**kwargs)


@pytest.mark.ddp
def test_ddp_equals_one_process_on_the_same_samples(tmp_path):
    """Each rank attacks every other sample; the summed counts equal one process attacking all of them."""
    res = run_ddp_script("robust_ddp.py", tmp_path / "robust_ddp.pt")
    model = Net()
    model.load_state_dict(res["state"])
    x, y = data(48, seed=1).tensors
    out = robust_outcomes(model, x[:41], y[:41], 0.1, attacks=ATTACKS)
    assert res["metrics"]["robust/clean_accuracy"] == pytest.approx(float(out.clean.float().mean()))
    assert res["metrics"]["robust/accuracy"] == pytest.approx(float(out.robust.float().mean()))
    assert res["metrics"]["robust/accuracy/pgd-20"] == pytest.approx(float(out.after["pgd-20"].float().mean()))


def test_the_threat_model_reaches_the_wandb_run_config_and_the_metrics_its_history(tmp_path):
    """A real offline W&B run, read back from its files: ε, the norm and the attacks in the config, the accuracies
    in the history."""
    from lightning.pytorch.loggers import WandbLogger

    from tests._lightning.test_wandb_reader import read_run

    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="robust")
    cb = RobustAccuracy(0.1, attacks=ATTACKS, n_samples=24)
    fit([cb], epochs=1, logger=logger)
    logger.experiment.finish()
    run = read_run(tmp_path)
    settings = run.config["lightning_gp/RobustAccuracy"]
    assert settings["eps"] == 0.1 and settings["norm"] == "linf" and settings["attacks"] == ATTACKS
    logged = [row for row in run.history if "robust/accuracy" in row]
    assert len(logged) == 1 and logged[0]["robust/accuracy"] == pytest.approx(cb.history[0]["robust/accuracy"])


class _BarReader(pl.Callback):
    """Reads the progress bar right after RobustAccuracy's evaluation, before Lightning closes it."""

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        bar = trainer.progress_bar_callback
        if isinstance(bar, pl.callbacks.TQDMProgressBar):
            self.seen = (bar.val_progress_bar.desc, bar.val_progress_bar.n, bar.val_progress_bar.total)
        else:
            task = bar.progress.tasks[bar.val_progress_bar_id]
            self.seen = (task.description, task.completed, task.total)


@pytest.mark.parametrize("kind", ["tqdm", "rich"])
@pytest.mark.parametrize("fn", ["fit", "validate"])
def test_progress_is_counted_in_lightnings_own_validation_bar(kind, fn):
    """The validation bar Lightning shows counts the attacked samples, one pass per attack, to its end."""
    if kind == "rich":
        pytest.importorskip("rich")
    bar = pl.callbacks.TQDMProgressBar() if kind == "tqdm" else pl.callbacks.RichProgressBar()
    reader = _BarReader()
    cb = RobustAccuracy(0.1, attacks=ATTACKS, n_samples=40)
    trainer = pl.Trainer(max_epochs=1, callbacks=[cb, reader, bar], **QUIET | {"enable_progress_bar": True,
                                                                             "enable_checkpointing": False})
    train, val = loaders()
    model = Net()
    trainer.fit(model, train, val) if fn == "fit" else trainer.validate(model, val, verbose=False)
    desc, done, total = reader.seen
    assert "RobustAccuracy (pgd-20, apgd-ce)" in desc
    assert done == total == 40 * len(ATTACKS)  # samples broken by PGD-20 count as settled for APGD-CE


def test_progress_gets_its_own_bar_beside_another_kind_of_progress_bar(capsys):
    class Dots(pl.callbacks.ProgressBar):  # a user's own bar: nothing of it to take over
        def __init__(self):
            super().__init__()
            self._enabled = True

        def disable(self):
            self._enabled = False

        @property
        def is_enabled(self):
            return self._enabled

    cb = RobustAccuracy(0.1, attacks=ATTACKS, n_samples=40)
    trainer = pl.Trainer(callbacks=[cb, Dots()], **QUIET | {"enable_progress_bar": True})
    trainer.validate(Net(), loaders()[1], verbose=False)
    assert "RobustAccuracy (pgd-20, apgd-ce)" in capsys.readouterr().err
    assert cb.history  # and it still measured
