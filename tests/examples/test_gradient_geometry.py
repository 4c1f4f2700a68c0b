"""Smoke test of examples/gradient_geometry.py: a short run of its CLI, every variant, figure written."""

from pathlib import Path

from examples.gradient_geometry import PANELS, VARIANTS, cli


def test_cli_trains_every_variant_and_plots_the_monitored_geometry(tmp_path):
    out = cli(["--epochs", "1", "--every_n_steps", "5", "--max_samples", "16", "--hidden", "32", "--lr", "0.01",
               "--logger", "csv", "--progress_bar", "false", "--out_dir", str(tmp_path)])
    assert list(out["series"]) == list(VARIANTS)
    for variant, rows in out["series"].items():
        assert sorted(rows) == [4, 9, 14, 19], variant  # 21 full batches, measured every 5th step
        for row in rows.values():
            assert all(key in row for key, _, _ in PANELS)
            assert 0 < row["mlp_inequality/ratio_mean"] <= 1
        assert out["final"][variant]["test_acc"] > 0.3  # one epoch already learns something
    assert Path(out["figure"]).read_bytes()[:4] == b"\x89PNG"
    # the CSV logger got the monitors' scalars too
    csvs = list(tmp_path.glob("gradient-geometry-*/plain/metrics.csv"))
    assert len(csvs) == 1 and "mlp_inequality/ratio_max" in csvs[0].read_text().splitlines()[0]
