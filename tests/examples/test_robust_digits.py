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


def test_summary_pairs_the_differences_by_seed():
    acc = {  # (clean, robust) per (variant, seed)
        ("plain", 0): (0.97, 0.40), ("plain", 1): (0.98, 0.44),
        ("fgsm", 0): (0.96, 0.80), ("fgsm", 1): (0.99, 0.86),
    }
    results = [{"variant": v, "seed": s, "clean": c, "robust": r, "seconds": 1.0} for (v, s), (c, r) in acc.items()]
    table, stats = summarize(results, ["plain", "fgsm"], [0, 1])
    d_robust = [100 * (acc["fgsm", s][1] - acc["plain", s][1]) for s in (0, 1)]  # 40 and 42 points
    assert stats["fgsm"]["d_robust"] == pytest.approx((statistics.fmean(d_robust), statistics.stdev(d_robust)))
    assert stats["fgsm"]["d_clean"][0] == pytest.approx(0.0, abs=1e-9)
    assert stats["plain"]["robust"] == pytest.approx((42.0, statistics.stdev([40.0, 44.0])))
    assert "| FGSM adv. training | 97.5 ± 2.1 | 83.0 ± 4.2 | +0.0 ± 1.4 | +41.0 ± 1.4 |" in table
    assert "| plain | 97.0 / 40.0 | 98.0 / 44.0 |" in table  # the per-seed table


def test_cli_runs_every_variant_end_to_end(tmp_path: Path, capsys):
    out_dir = tmp_path / "out"
    result = cli([
        "--epochs", "1", "--pgd_steps", "2", "--hidden", "32", "--batch_size", "64", "--lr", "0.01",
        "--out_dir", str(out_dir), "--progress_bar", "false",
    ])
    printed = capsys.readouterr().out
    assert [r["variant"] for r in result["results"]] == list(VARIANTS)
    for r in result["results"]:
        assert 0.0 <= r["robust"] <= 1.0 and 0.0 <= r["clean"] <= 1.0
        # One epoch already learns something: far above the 10 % of chance.
        assert r["clean"] > 0.3
    table = (out_dir / "results.md").read_text()
    assert table.strip() in printed
    assert "| PGD-2 acc % |" in table  # the attack that was run, not a hard-coded label
    for label in ("| plain |", "| data penalty |", "| FGSM adv. training |", "| parameter penalty |"):
        assert label in table
    png = out_dir / "robust_digits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # W&B offline (the default): one run per training plus the summary run, which holds the chart.
    runs = sorted((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(VARIANTS) + 1
    assert list((out_dir / "wandb").glob("offline-run-*/files/media/images/accuracy_chart*.png"))
