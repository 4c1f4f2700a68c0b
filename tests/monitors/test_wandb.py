"""The monitors on a real offline W&B run beside a CSVLogger, read back from the run's .wandb file."""


import pytest
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_gp.monitors import GradientNormMonitor, MLPInequalityMonitor, SpectralNormMonitor
from tests._lightning.test_wandb_reader import _records, read_run
from tests.monitors.support import Classifier, loader, read_csv, trainer

SCALARS = {
    "grad_norm/input_mean", "grad_norm/input_max", "grad_norm/param_per_sample_mean",
    "grad_norm/param_per_sample_max", "grad_norm/param_batch", "grad_norm/layer/net.0", "grad_norm/layer/net.2",
    "grad_norm/layer/net.4", "mlp_inequality/ratio_mean", "mlp_inequality/ratio_max", "mlp_inequality/lhs_mean",
    "mlp_inequality/rhs_mean", "lipschitz/upper_bound",
    *(f"mlp_inequality/{side}_term/net.{i}" for side in ("lhs", "rhs") for i in (0, 2, 4)),
    *(f"lipschitz/sigma/net.{i}" for i in (0, 2, 4)),
}  # fmt: skip


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("wandb")
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="monitors")
    csv_logger = CSVLogger(tmp_path)
    monitors = [GradientNormMonitor(per_layer=True, every_n_steps=2, media_every_n_steps=2),
                MLPInequalityMonitor(every_n_steps=2, max_samples=4, media_every_n_steps=2),
                SpectralNormMonitor(every_n_steps=2)]
    trainer(tmp_path, callbacks=monitors, logger=[wandb_logger, csv_logger], max_steps=4).fit(Classifier(), loader())
    wandb_logger.experiment.finish()
    return read_run(tmp_path), read_csv(tmp_path / "lightning_logs/version_0/metrics.csv")


def test_scalars_reach_wandb_and_csv_with_the_same_values_at_the_same_steps(logged):
    run, csv_rows = logged
    csv = {}
    for row in csv_rows:
        csv.update({(int(row["step"]), k): v for k, v in row.items() if k in SCALARS})
    assert {k for _, k in csv} == SCALARS
    assert {s for s, _ in csv} == {1, 3}  # optimizer steps 2 and 4, at Lightning's 0-based step
    wandb = {(row["trainer/global_step"], k): v for row in run.history for k, v in row.items() if k in SCALARS}
    assert wandb == pytest.approx(csv, rel=1e-6)


def test_wandb_summaries_keep_the_max_of_the_ratio_over_the_run(logged):
    run, _ = logged
    assert run.metrics["mlp_inequality/ratio_max"].summary.max
    assert run.metrics["mlp_inequality/ratio_max"].step_metric == "trainer/global_step"
    assert run.metrics["lipschitz/upper_bound"].summary.max
    ratios = [v for _, v in run.values("mlp_inequality/ratio_max")]
    assert len(ratios) == 2 and 0 < max(ratios) <= 1
    # the max over the run and the last value (W&B's default, which a max summary alone would hide)
    expected = {"max": pytest.approx(max(ratios)), "last": pytest.approx(ratios[-1])}
    assert run.summary["mlp_inequality/ratio_max"] == expected


def test_the_run_config_holds_every_monitor_s_settings(logged):
    run, _ = logged
    assert run.config["lightning_gp/GradientNormMonitor"]["every_n_steps"] == 2
    assert run.config["lightning_gp/GradientNormMonitor"]["mode"] == "recompute"
    assert run.config["lightning_gp/MLPInequalityMonitor"]["max_samples"] == 4
    assert run.config["lightning_gp/SpectralNormMonitor"]["n_iter"] == 10


def test_a_logger_prefix_reaches_scalars_media_and_summaries(tmp_path):
    from lightning_gp import DataGradientPenalty

    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="monitors", prefix="exp")
    monitors = [GradientNormMonitor(per_layer=True, every_n_steps=2),
                MLPInequalityMonitor(every_n_steps=2, max_samples=4)]
    trainer(tmp_path, callbacks=[*monitors, DataGradientPenalty(0.1)], logger=[wandb_logger],
            max_steps=4).fit(Classifier(), loader())
    wandb_logger.experiment.finish()
    run = read_run(tmp_path)
    keys = run.keys() - {"trainer/global_step", "_step", "_runtime", "_timestamp", "epoch"}
    assert {"exp-grad_norm/input_max", "exp-grad_norm/input", "exp-mlp_inequality/lhs_vs_rhs_table"} <= keys
    assert all(k.startswith("exp-") for k in keys), sorted(k for k in keys if not k.startswith("exp-"))
    assert run.metrics["exp-mlp_inequality/ratio_max"].summary.max
    assert set(run.summary["exp-mlp_inequality/ratio_max"]) == {"max", "last"}
    assert run.config["lightning_gp/DataGradientPenalty"]["weight"] == 0.1


def test_wandb_gets_histograms_table_scatter_and_image(logged):
    run, _ = logged
    for key in ("grad_norm/input", "grad_norm/param_per_sample"):
        hists = run.values(key)
        assert [step for step, _ in hists] == [1, 3]
        assert all(h["_type"] == "histogram" and sum(h["values"]) == 8 for _, h in hists)  # batch of 8

    # one table behind the scatter of lhs against rhs, that accumulates: each measurement appends its rows (an
    # increment) with its step; W&B's entry of the table counts every row so far
    table = "mlp_inequality/lhs_vs_rhs_table"
    increments = run.table_rows(table)
    assert [step for step, _ in increments] == [1, 3]
    assert [value["_type"] for _, value in run.values(table)] == ["incremental-table-file"] * 2
    assert [int(value["nrows"]) for _, value in run.values(table)] == [4, 8]
    for step, rows in increments:
        assert len(rows) == 4 and {r["step"] for r in rows} == {step}  # max_samples, this step's
        for r in rows:
            assert r["lhs"] <= r["rhs"] * (1 + 1e-5) and r["ratio"] == pytest.approx(r["lhs"] / r["rhs"])
    spec = run.config["_wandb/visualize/mlp_inequality/lhs_vs_rhs"]["panel_config"]
    assert spec["panelDefId"] == "wandb/scatter/v0" and spec["fieldSettings"] == {"x": "rhs", "y": "lhs"}
    # the bound lhs = rhs drawn as a line: the sorted ratios beside the line at 1
    [(step, lines)] = run.table_rows("mlp_inequality/ratio_sorted_table")[-1:]
    bound = [r for r in lines if r["lineKey"] == "bound: lhs = rhs"]
    ratios = [r["lineVal"] for r in lines if r["lineKey"] == "lhs / rhs, sorted"]
    assert [(r["step"], r["lineVal"]) for r in bound] == [(0.0, 1.0), (1.0, 1.0)]  # W&B calls x "step"
    assert ratios == sorted(ratios) and len(ratios) == 4 and max(ratios) <= 1 + 1e-5
    ratios = run.values("mlp_inequality/ratio")  # the ratio's distribution, at each media step
    assert [s for s, _ in ratios] == [1, 3] and all(sum(h["values"]) == 4 for _, h in ratios)
    # ‖∇ₓℓᵢ‖ against ‖∇θℓᵢ‖: W&B's scatter chart over a per-sample table that accumulates every measurement
    scatter = run.table_rows("grad_norm/input_vs_param_table")
    assert [step for step, _ in scatter] == [1, 3]
    assert all(len(rows) == 8 and {r["step"] for r in rows} == {step} for step, rows in scatter)  # batch of 8
    image = run.values("mlp_inequality/lhs_vs_rhs_image")[-1][1]
    assert image["_type"] == "image-file" and image["format"] == "png"
    assert (run.dir / "files" / image["path"]).read_bytes()[:4] == b"\x89PNG"


def test_fused_monitor_histograms_are_the_per_sample_norms(tmp_path):
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="fused")
    fused = GradientNormMonitor(per_layer=True, every_n_steps=2, mode="fused")
    trainer(tmp_path, callbacks=[fused], logger=[wandb_logger], max_steps=2).fit(Classifier(), loader())
    wandb_logger.experiment.finish()
    run = read_run(tmp_path)
    for key, top in (("grad_norm/input", "input_max"), ("grad_norm/param_per_sample", "param_per_sample_max")):
        [(step, hist)] = run.values(key)
        assert step == 1 and hist["_type"] == "histogram" and sum(hist["values"]) == 8
        # the recorded norms scaled by the per-sample factor, as the logged maximum is
        assert max(hist["bins"]) == pytest.approx(fused.last_logged[f"grad_norm/{top}"], rel=1e-5)


def test_media_have_their_own_cadence_and_the_run_stays_small_measured_every_step(tmp_path):
    """200 steps measured every step (scalars every step, media at the default 10 × the interval): at most 3 kB of
    history records a step (measured 2.5 kB; over 2000 steps 2.6 kB; the whole .wandb file, with W&B's own summary
    record after each history row, 5.7 kB); the media land on steps 0, 10, 20, ..."""
    wandb_logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="monitors")
    monitors = [GradientNormMonitor(per_layer=True, every_n_steps=1),
                MLPInequalityMonitor(every_n_steps=1, max_samples=4),
                SpectralNormMonitor(every_n_steps=1)]
    trainer(tmp_path, callbacks=monitors, logger=[wandb_logger], max_steps=200).fit(
        Classifier(), loader(n=64))
    wandb_logger.experiment.finish()
    run = read_run(tmp_path)
    assert [s for s, _ in run.values("grad_norm/input")] == list(range(0, 200, 10))
    assert [s for s, _ in run.values("mlp_inequality/lhs_vs_rhs_table")] == list(range(0, 200, 10))
    assert int(run.values("mlp_inequality/lhs_vs_rhs_table")[-1][1]["nrows"]) == 20 * 4  # every measurement
    records = _records(next(run.dir.glob("run-*.wandb")), timeout=30)
    history_bytes = sum(r.ByteSize() for r in records if r.WhichOneof("record_type") == "history")
    assert history_bytes / 200 <= 3000, f"{history_bytes / 200:.0f} bytes of history a step"
