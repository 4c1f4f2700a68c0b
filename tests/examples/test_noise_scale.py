"""The noise-scale example end to end, tiny: one curve per batch size and a chart."""

from __future__ import annotations

from pathlib import Path

from examples.noise_scale_digits import cli


def test_cli_charts_one_curve_per_batch_size(tmp_path: Path):
    result = cli(["--batch_sizes", "[32, 128]", "--epochs", "2", "--hidden", "32", "--out_dir", str(tmp_path)])
    assert set(result["curves"]) == {32, 128}
    assert all(len(points) >= 3 for points in result["curves"].values())
    assert Path(result["chart"]).stat().st_size > 10_000
