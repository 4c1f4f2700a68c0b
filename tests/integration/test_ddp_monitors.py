import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_gp.monitors import GradientNoiseScale, GradientNormMonitor, MLPInequalityMonitor, SpectralNormMonitor
from tests._lightning.test_wandb_reader import read_run
from tests.ddp import run_ddp_script
from tests.monitors.support import Classifier, loader, read_csv, trainer

PREFIXES = ("grad_norm/", "mlp_inequality/", "lipschitz/", "noise_scale/")


def _by_step(rows):
    out = {}
    for row in rows:
        out.update({(int(row["step"]), k): v for k, v in row.items() if k.startswith(PREFIXES)})
    return out


@pytest.mark.ddp
def test_two_ranks_log_what_one_process_logs_on_the_combined_batch(tmp_path):
    ddp = run_ddp_script("monitors_ddp.py", tmp_path / "ddp.pt")
    assert ddp["world_size"] == 2
    ddp_logged = _by_step(read_csv(f"{ddp['root']}/lightning_logs/version_0/metrics.csv"))
    # the noise scale's two-batch estimate needs two ranks: logged only there
    two_batch = {k: ddp_logged.pop(k) for k in [k for k in ddp_logged if "/two_batch/" in k[1]]}
    assert sorted(k for _, k in two_batch) == [f"noise_scale/two_batch/{k}" for k in ("b_simple", "grad_sq",
                                                                                        "trace_sigma")]

    model = Classifier()
    model.load_state_dict(ddp["initial"])
    monitors = [GradientNormMonitor(per_layer=True, every_n_steps=2),
                MLPInequalityMonitor(every_n_steps=2, max_samples=8),
                SpectralNormMonitor(every_n_steps=2),
                GradientNormMonitor(per_layer=True, every_n_steps=3, histograms=False, mode="fused"),
                GradientNoiseScale(every_n_steps=4, ema=0.9)]
    trainer(tmp_path / "one", callbacks=monitors, logger=CSVLogger(tmp_path / "one"), max_steps=4).fit(
        model, loader(n=32, batch_size=8)
    )
    one_logged = _by_step(read_csv(tmp_path / "one/lightning_logs/version_0/metrics.csv"))

    # 22 keys at steps 1 and 3, the fused monitor's 8 grad_norm keys at step 2, the noise scale's 6 at step 3
    assert len(one_logged) == 2 * 22 + 8 + 6 and ddp_logged.keys() == one_logged.keys()
    assert ddp_logged == pytest.approx(one_logged, rel=1e-5)
    # every rank holds the reduced values, not only rank 0 (whose loggers write)
    noise = {k: v for (s, k), v in one_logged.items() if k.startswith("noise_scale/")}
    assert len(noise) == 6 and {k: v for k, v in ddp["last_logged"][4].items() if "two_batch" not in k} == \
        pytest.approx(noise, rel=1e-5)
    last = {k: v for (s, k), v in one_logged.items() if s == 3 and k.startswith("grad_norm/")}
    assert ddp["last_logged"][0] == pytest.approx(last, rel=1e-5)
    fused = {k: v for (s, k), v in one_logged.items() if s == 2}
    assert len(fused) == 8 and ddp["last_logged"][3] == pytest.approx(fused, rel=1e-5)

    # W&B: one run (rank 0), histograms and tables once per measurement, of both ranks' samples: the media
    # describe the samples the scalars beside them reduce (a histogram's top edge is the logged max)
    run = read_run(ddp["root"])
    hists = run.values("grad_norm/input")
    assert [s for s, _ in hists] == [1, 3] and all(sum(h["values"]) == 8 for _, h in hists)
    for step, hist in hists:
        assert hist["bins"][-1] == pytest.approx(ddp_logged[(step, "grad_norm/input_max")], rel=1e-5)
    tables = run.values("mlp_inequality/lhs_vs_rhs_table")
    assert [s for s, _ in tables] == [1, 3]
    import json

    rows = json.loads((run.dir / "files" / tables[-1][1]["path"]).read_text())["data"]
    assert len(rows) == 8  # 4 samples from each rank
    assert max(r[4] for r in rows) == pytest.approx(ddp_logged[(3, "mlp_inequality/ratio_max")], rel=1e-5)
    wandb_logged = {(r["trainer/global_step"], k): v for r in run.history for k, v in r.items()
                    if k.startswith(PREFIXES) and isinstance(v, float) and "/two_batch/" not in k}
    assert wandb_logged == pytest.approx(ddp_logged, rel=1e-6)
