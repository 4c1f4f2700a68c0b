"""The leaderboard example: a tiny end-to-end run of its CLI, every method and the large-ε part."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.robust_leaderboard import CO_METHODS, METHODS, cli


def test_cli_runs_every_method_and_the_large_radius_part(tmp_path: Path, capsys):
    pytest.importorskip("torchattacks")
    out = tmp_path / "out"
    result = cli(["--epochs", "2", "--co_epochs", "2", "--seeds", "[0]", "--hidden", "32", "--attacks", "[apgd-ce]",
                  "--val_samples", "40", "--test_samples", "40", "--out_dir", str(out), "--logger", "csv"])
    printed = capsys.readouterr().out
    assert [r["variant"] for r in result["results"]] == list(METHODS)
    assert [r["variant"] for r in result["co_results"]] == list(CO_METHODS)
    for r in result["results"]:
        best = r["best"]
        assert best["autoattack"] <= best["clean"] and best["epoch"] in (1, 2) and len(r["curve"]) == 2
    table = (out / "results.md").read_text()
    assert table.strip() in printed and "At ε = 0.2" in table
    for label in ("| TRADES |", "| MART |", "| PGD-10 + AWP |", "| TRADES + AWP |", "| FGSM + GradAlign |"):
        assert table.count(label) == 1
    for name in ("leaderboard.png", "leaderboard_curves.png", "catastrophic_overfitting.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
