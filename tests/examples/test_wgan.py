"""The WGAN-GP examples: toy metrics against known answers, and tiny end-to-end runs of both scripts."""

from __future__ import annotations

import math

import pytest
import torch

from examples._toy_data import (
    ModeSpec,
    ToyStream,
    mode_coverage,
    mode_spec,
    sample,
    wasserstein1,
    wasserstein1_floor,
)

# --------------------------------------------------------------------------------------- toy metrics


def test_samples_at_the_modes_capture_all_of_them():
    spec = mode_spec("25gaussians")
    cov = mode_coverage(spec.means.repeat(4, 1), spec)
    assert (cov.modes_captured, cov.num_modes, cov.high_quality) == (25, 25, 1.0)
    ring = mode_spec("8gaussians")
    assert mode_coverage(ring.means, ring).modes_captured == 8


def test_grid_and_ring_match_pacgan():
    grid = mode_spec("25gaussians")
    assert grid.sigma == 0.05
    assert sorted(set(grid.means[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    ring = mode_spec("8gaussians")
    assert torch.allclose(ring.means.norm(dim=1), torch.full((8,), 2.0, dtype=torch.float64))


def test_high_quality_is_within_three_sigma_of_the_nearest_mode():
    spec = ModeSpec(torch.tensor([[0.0, 0.0], [10.0, 0.0]], dtype=torch.float64), sigma=0.1)
    # 0.29 and 9.71 are within 3σ = 0.3 of a mode (one good sample per mode); 0.31 and 5.0 are not.
    x = torch.tensor([[0.29, 0.0], [9.71, 0.0], [0.31, 0.0], [5.0, 0.0]])
    cov = mode_coverage(x, spec)
    assert cov.modes_captured == 2 and cov.high_quality == pytest.approx(0.5)
    # A mode whose only nearby sample is outside 3σ is not captured.
    cov = mode_coverage(torch.tensor([[0.0, 0.0], [9.5, 0.0]]), spec)
    assert cov.modes_captured == 1 and cov.high_quality == pytest.approx(0.5)


def test_real_samples_score_what_the_rayleigh_law_predicts():
    # For an isotropic 2-D Gaussian, P(‖x − μ‖ ≤ 3σ) = 1 − exp(−9/2) ≈ 98.9 %.
    x = sample("25gaussians", 20000, torch.Generator().manual_seed(0))
    cov = mode_coverage(x, mode_spec("25gaussians"))
    assert cov.modes_captured == 25
    assert cov.high_quality == pytest.approx(1 - math.exp(-4.5), abs=0.003)


def test_collapsed_generator_captures_one_mode():
    spec = mode_spec("25gaussians")
    x = spec.means[7].float() + 0.01 * torch.randn(500, 2)
    assert mode_coverage(x, spec).modes_captured == 1


def test_wasserstein1_of_identical_sets_is_zero_and_of_a_shift_is_the_shift():
    a = sample("8gaussians", 300, torch.Generator().manual_seed(1))
    assert wasserstein1(a, a[torch.randperm(300)]) == pytest.approx(0.0, abs=1e-9)
    shift = torch.tensor([0.3, -0.4])  # |shift| = 0.5; translation is optimal for W1 (Jensen)
    assert wasserstein1(a, a + shift) == pytest.approx(0.5, abs=1e-6)


def test_wasserstein1_matches_brute_force_on_a_tiny_case():
    import itertools

    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    cost = torch.cdist(a.double(), b.double())
    brute = min(sum(cost[i, p[i]].item() for i in range(6)) / 6 for p in itertools.permutations(range(6)))
    assert wasserstein1(a, b) == pytest.approx(brute, rel=1e-9)


def test_wasserstein1_floor_is_small_and_collapse_is_far():
    floor = wasserstein1_floor("25gaussians", 500)
    real = sample("25gaussians", 500, torch.Generator().manual_seed(5))
    collapsed = torch.zeros(500, 2)
    assert floor < 0.5 < wasserstein1(collapsed, real)


def test_metric_and_sampler_errors():
    with pytest.raises(ValueError, match="Unknown toy dataset 'moons'"):
        sample("moons", 10)
    with pytest.raises(ValueError, match="`n` must be a positive"):
        sample("swissroll", 0)
    with pytest.raises(ValueError, match=r"`a` and `b` must be \(n, d\) samples of the same shape"):
        wasserstein1(torch.zeros(3, 2), torch.zeros(4, 2))


def test_stream_yields_fresh_batches():
    it = iter(ToyStream("swissroll", 16, seed=0))
    first, second = next(it), next(it)
    assert first.shape == (16, 2) and not torch.equal(first, second)
    assert torch.equal(first, next(iter(ToyStream("swissroll", 16, seed=0))))  # seeded


# --------------------------------------------------------------------------------- end-to-end runs


def test_toy_example_runs_end_to_end(tmp_path, monkeypatch):
    from examples import wgan_gp_toy

    monkeypatch.chdir(tmp_path)
    cli = wgan_gp_toy.main(
        [
            "fit",
            "--model.dataset=25gaussians",
            "--model.width=16",
            "--model.batch_size=32",
            "--model.max_generator_steps=4",
            "--model.eval_every=2",
            "--model.n_critic=2",
            f"--model.out_dir={tmp_path / 'out'}",
        ]
    )
    model = cli.model
    assert [row["generator_step"] for row in model.history] == [2, 4]
    assert {"modes_captured", "high_quality", "w1", "w1_floor"} <= set(model.history[-1])
    for name in ("samples.png", "critic.png", "curves.png", "metrics.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # The W&B run was written offline, with the three figures logged as images.
    (run,) = (tmp_path / "outputs" / "wandb").glob("offline-run-*")
    assert len(list(run.glob("files/media/images/**/*.png"))) == 3


def test_toy_example_swissroll_has_no_mode_metrics(tmp_path, monkeypatch):
    from examples import wgan_gp_toy

    monkeypatch.chdir(tmp_path)
    cli = wgan_gp_toy.main(
        [
            "fit",
            "--model.dataset=swissroll",
            "--model.width=16",
            "--model.batch_size=32",
            "--model.max_generator_steps=2",
            "--model.eval_every=2",
            "--model.n_critic=2",
            "--model.regularizer=r1",
            "--trainer.logger=false",
            f"--model.out_dir={tmp_path / 'out'}",
        ]
    )
    assert "modes_captured" not in cli.model.history[-1] and cli.model.history[-1]["w1"] > 0
    assert (tmp_path / "out" / "critic.png").exists()


def test_toy_example_rejects_unknown_dataset():
    from examples.wgan_gp_toy import ToyWGAN

    with pytest.raises(ValueError, match="`dataset` must be one of"):
        ToyWGAN(dataset="moons")


def test_digits_example_runs_end_to_end(tmp_path, monkeypatch):
    from examples import wgan_gp_digits

    monkeypatch.chdir(tmp_path)
    wgan_gp_digits.main(
        [
            "fit",
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--model.channels=4",
            "--model.n_critic=2",
            "--trainer.logger=false",  # W&B image logging is covered by the toy test
            f"--model.out_dir={tmp_path / 'out'}",
        ]
    )
    grids = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert grids == ["samples_epoch000.png", "samples_epoch001.png"]


def test_regularizer_sweep_runs_and_reports_the_last_quarter(tmp_path):
    from examples import wgan_gp_toy_sweep

    tiny = ["--model.width=16", "--model.batch_size=32", "--model.max_generator_steps=8", "--model.eval_every=2",
            "--model.n_critic=2"]
    text = wgan_gp_toy_sweep.main(regularizers=["gp", "weight_clipping"], jobs=2, out_dir=str(tmp_path), extra=tiny)
    lines = text.splitlines()
    assert lines[0].startswith("25gaussians, 8 generator steps")
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["`gp`", "`weight_clipping`"]
    assert (tmp_path / "25gaussians.md").read_text().strip() == text
    for reg in ("gp", "weight_clipping"):
        assert (tmp_path / f"25gaussians-{reg}-seed0" / "samples.png").stat().st_size > 0


def test_sweep_summary_takes_the_worst_mode_count_of_the_last_quarter(tmp_path):
    from examples.wgan_gp_toy_sweep import summarize

    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text(
        "generator_step,modes_captured,high_quality,w1,w1_floor\n"
        "100,10,0.1,2.0,0.4\n700,25,0.80,0.5,0.4\n800,21,0.70,0.5,0.4\n900,25,0.90,0.4,0.4\n"
    )
    row = summarize(csv_path, regularizer="gp")
    # The last quarter is steps ≥ 675: 700, 800, 900.
    assert (row["modes"], row["tail_min_modes"], row["steps"]) == (25, 21, 900)
    assert row["high_quality"] == pytest.approx(90.0)
    assert row["tail_high_quality"] == pytest.approx(80.0)
