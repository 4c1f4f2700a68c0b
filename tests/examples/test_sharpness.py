"""The sharpness example: its noisy split, its summary table, and a tiny end-to-end run of its CLI."""

from __future__ import annotations

from pathlib import Path

import torch

from examples._digits import digits_tensors
from examples.sharpness_digits import VARIANTS, cli, noisy_digits, summarize


def test_noisy_split_flips_the_asked_fraction_and_keeps_validation_and_test_clean():
    x_tr, y_tr, _, y_te = digits_tensors()
    train, val, test = noisy_digits(0.4, seed=0)
    assert len(train) + len(val) == len(x_tr) and len(val) == len(x_tr) // 5
    assert torch.equal(test.tensors[1], y_te)
    # the clean label of each training digit, found by its pixels
    clean = {tuple(x.tolist()): int(y) for x, y in zip(x_tr, y_tr, strict=True)}
    noisy = train.tensors[1]
    truth = torch.tensor([clean[tuple(x.tolist())] for x in train.tensors[0]])
    flipped = float((noisy != truth).float().mean())
    assert 0.36 < flipped < 0.44  # 40 % flipped, each to another class
    assert all(clean[tuple(x.tolist())] == int(y) for x, y in zip(*val.tensors, strict=True))
    assert torch.equal(noisy_digits(0.4, seed=0)[0].tensors[1], noisy)  # a function of the seed
    assert not torch.equal(noisy_digits(0.4, seed=1)[0].tensors[1][:50], noisy[:50])


def test_summary_reports_mean_and_spread_per_method():
    results = [{"variant": v, "seed": s, "test_acc": acc, "final_acc": acc - 0.1, "lambda_max": lam, "seconds": 2.0}
               for v, s, acc, lam in [("plain", 0, 0.80, 30.0), ("plain", 1, 0.82, 34.0),
                                      ("sam", 0, 0.85, 10.0), ("sam", 1, 0.87, 12.0)]]
    table = summarize(results, ["plain", "sam"], [0, 1], noise=0.4, epochs=40, lr=0.05)
    assert "| plain | 81.0 ± 1.4 | 71.0 ± 1.4 | 32.0 ± 2.8 | 30.0, 34.0 | 2.0 |" in table
    assert "| SAM | 86.0 ± 1.4 | 76.0 ± 1.4 | 11.0 ± 1.4 | 10.0, 12.0 | 2.0 |" in table
    assert "2/η = 40" in table


def test_cli_runs_every_variant_end_to_end(tmp_path: Path, capsys):
    out_dir = tmp_path / "out"
    result = cli(["--epochs", "2", "--seeds", "[0]", "--hidden", "32", "--monitor_every", "5", "--logger", "none",
                  "--out_dir", str(out_dir)])
    assert {r["variant"] for r in result["results"]} == set(VARIANTS)
    assert all(0 <= r["test_acc"] <= 1 and r["lambda_max"] > 0 for r in result["results"])
    assert (out_dir / "results.md").read_text().count("\n| ") == len(VARIANTS) + 1
    assert Path(result["chart"]).stat().st_size > 10_000
    assert "| SAM |" in capsys.readouterr().out
