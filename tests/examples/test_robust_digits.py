"""The robust-digits example: its data split, its summary table, and a tiny end-to-end run of its CLI."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

from examples._digits import DigitsDataModule, digits_tensors
from examples.robust_digits import VARIANTS, cli, summarize


def test_digits_are_scaled_to_the_unit_interval_and_split_stratified():
    x_tr, y_tr, x_te, y_te = digits_tensors()
    assert x_tr.shape == (1347, 64) and x_te.shape == (450, 64)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.long
    assert float(torch.cat([x_tr, x_te]).min()) == 0.0 and float(torch.cat([x_tr, x_te]).max()) == 1.0
    # 16 is the largest pixel count: the scaling is /16, so every value is a multiple of 1/16.
    assert torch.equal(x_tr * 16, (x_tr * 16).round())
    # Stratified: every class holds 25 % ± one sample of its digits in the test set.
    for c in range(10):
        n_te, n_all = int((y_te == c).sum()), int((y_te == c).sum() + (y_tr == c).sum())
        assert abs(n_te - 0.25 * n_all) <= 1
    # Fixed split: the same seed gives the same test set, another seed another one.
    assert torch.equal(digits_tensors()[2], x_te)
    assert not torch.equal(digits_tensors(split_seed=1)[2], x_te)


def test_datamodule_serves_the_split():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 64) and y.shape == (32,)
    assert sum(b[0].shape[0] for b in dm.test_dataloader()) == 450
    assert sum(b[0].shape[0] for b in dm.val_dataloader()) == 450  # no validation split: the test set


def test_validation_split_is_carved_from_the_training_digits():
    dm = DigitsDataModule(val_size=0.15)
    dm.setup("fit")
    x_tr, _, x_te, _ = digits_tensors()
    train, val = dm.train_set.tensors, dm.val_set.tensors
    assert len(train[0]) + len(val[0]) == len(x_tr) and len(val[0]) == 203
    assert torch.equal(dm.test_set.tensors[0], x_te)  # the test set is untouched
    rows = lambda t: {tuple(r.tolist()) for r in t}  # noqa: E731
    assert rows(val[0]) <= rows(x_tr) and torch.equal(next(iter(dm.val_dataloader()))[0], val[0])
    assert set(val[1].tolist()) == set(range(10))  # stratified: every class is validated


def _run(variant: str, seed: int, best: tuple, last: tuple) -> dict:
    keys = ("clean", "pgd20", "autoattack")
    return {"variant": variant, "seed": seed, "fit_seconds": 1.0, "n_test": 450, "curve": [(1, 0.5)],
            "best": {"epoch": 3, **dict(zip(keys, best, strict=True)), "broken_after_apgd": 0},
            "last": {"epoch": 5, **dict(zip(keys, last, strict=True)), "broken_after_apgd": 1}}


def test_summary_gives_mean_and_sd_per_checkpoint():
    results = [_run("plain", 0, (0.97, 0.40, 0.30), (0.98, 0.30, 0.20)),
               _run("plain", 1, (0.95, 0.44, 0.34), (0.98, 0.32, 0.22)),
               _run("fgsm", 0, (0.96, 0.80, 0.78), (0.96, 0.70, 0.68)),
               _run("fgsm", 1, (0.98, 0.86, 0.82), (0.96, 0.72, 0.70))]
    table, stats = summarize(results, ["plain", "fgsm"], [0, 1], epsilon=0.1, suite="standard")
    assert stats["plain"]["best"]["autoattack"] == pytest.approx((32.0, statistics.stdev([30.0, 34.0])))
    assert stats["fgsm"]["last"]["pgd20"] == pytest.approx((71.0, statistics.stdev([70.0, 72.0])))
    assert "| FGSM-RS training | 97.0 ± 1.4 | 83.0 ± 4.2 | 80.0 ± 2.8 | 3/3 | 1 |" in table
    assert "| plain | 98.0 ± 0.0 | 31.0 ± 1.4 | 21.0 ± 1.4 | 5/5 | 1 |" in table
    assert "FAB-T and Square broke 4 sample(s)" in table  # the last checkpoints' one each
    one, _ = summarize(results[:1], ["plain"], [0], epsilon=0.1, suite="fast")
    assert "±" not in one and "FAB-T" not in one  # one seed: no spread; no FAB-T or Square were run


def test_cli_runs_every_variant_end_to_end(tmp_path: Path, capsys):
    pytest.importorskip("torchattacks")
    out_dir = tmp_path / "out"
    result = cli([
        "--epochs", "3", "--seeds", "[0]", "--hidden", "32", "--lr", "0.01", "--attacks", "[apgd-ce]",
        "--val_attacks", "[pgd-20]", "--val_samples", "60", "--test_samples", "60",
        "--out_dir", str(out_dir), "--progress_bar", "false",
    ])
    printed = capsys.readouterr().out
    assert [r["variant"] for r in result["results"]] == list(VARIANTS)
    for r in result["results"]:
        assert [e for e, _ in r["curve"]] == [1, 2, 3]  # robust validation every epoch
        values = [v for _, v in r["curve"]]
        # the best checkpoint is the first epoch of highest robust validation accuracy; the last is the last
        assert r["best"]["epoch"] == 1 + values.index(max(values)) and r["last"]["epoch"] == 3
        for which in ("best", "last"):
            m = r[which]
            assert 0.0 <= m["autoattack"] <= m["pgd20"] + 0.2 and m["autoattack"] <= m["clean"] <= 1.0
            assert m["clean"] > 0.3  # far above the 10 % of chance
    table = (out_dir / "results.md").read_text()
    assert table.strip() in printed and "AutoAttack = apgd-ce" in table and "60 held-out test digits" in table
    for label in ("| plain |", "| data penalty |", "| FGSM-RS training |", "| PGD-10 training |",
                  "| parameter penalty |"):
        assert table.count(label) == 2  # best and last
    for name in ("robust_digits.png", "robust_curve.png"):
        png = out_dir / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # W&B offline (the default): one run per training plus the summary run, which holds both charts.
    runs = sorted((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(VARIANTS) + 1
    for key in ("accuracy_chart", "robust_curve"):
        assert list((out_dir / "wandb").glob(f"offline-run-*/files/media/images/{key}*.png"))
