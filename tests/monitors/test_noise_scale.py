"""GradientNoiseScale against a brute-force estimate: per-sample gradients materialised with torch.func, the
covariance trace computed directly (float64), on the steps the monitor logs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from lightning_gp import DataGradientPenalty, GradientNoiseScale
from lightning_gp.functional import noise_scale, two_batch_noise_scale
from tests.monitors.support import Classifier, dataset, loader, trainer


def _brute(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """tr Σ as the trace of the sample covariance of the materialised per-sample gradients (N − 1), and the
    unbiased |G|² = ‖ḡ‖² − tr Σ / N."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model.net, {k[4:]: v for k, v in p.items()}, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    g = torch.cat([v.reshape(len(x), -1) for v in per_sample.values()], dim=1)
    n = len(x)
    trace = float(((g - g.mean(0)) ** 2).sum() / (n - 1))
    grad_sq = float(g.mean(0).square().sum()) - trace / n
    return {"noise_scale/trace_sigma": trace, "noise_scale/grad_sq": grad_sq, "noise_scale/b_simple": trace / grad_sq}


def _double(model: Classifier) -> Classifier:
    model = model.double()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.0)  # θ stays where it starts
    return model


@pytest.mark.parametrize("mode", ["fused", "recompute"])
@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_logged_estimate_equals_the_brute_force_one(tmp_path, mode, accumulate):
    torch.manual_seed(0)
    model = _double(Classifier())
    data = dataset(32)
    data.tensors = tuple(t.double() if t.is_floating_point() else t for t in data.tensors)
    monitor = GradientNoiseScale(every_n_steps=1, ema=None, mode=mode)
    trainer(tmp_path, callbacks=[monitor], max_steps=1, accumulate_grad_batches=accumulate).fit(
        model, torch.utils.data.DataLoader(data, batch_size=8))
    x, y = data.tensors[0][: 8 * accumulate], data.tensors[1][: 8 * accumulate]
    want = _brute(model, x, y)
    if mode == "recompute" and accumulate > 1:
        # S from the first micro-batch only, ḡ over both: another unbiased estimate, checked by its formula
        first = _brute(model, x[:8], y[:8])
        s = first["noise_scale/grad_sq"] + first["noise_scale/trace_sigma"]  # mean ‖gᵢ‖² = ‖ḡ‖² + (n − 1)/n · tr
        gbar = want["noise_scale/grad_sq"] + want["noise_scale/trace_sigma"] / 16
        est = noise_scale(s, gbar, 16)
        want = {"noise_scale/trace_sigma": float(est.trace_sigma), "noise_scale/grad_sq": float(est.grad_sq),
                "noise_scale/b_simple": float(est.b_simple)}
    assert monitor.last_logged == pytest.approx(want, rel=1e-9)


def test_the_run_is_bit_identical_and_the_ema_is_the_bias_corrected_average(tmp_path):
    torch.manual_seed(0)
    base = Classifier()
    plain, monitored = copy.deepcopy(base), copy.deepcopy(base)
    trainer(tmp_path / "a", max_steps=4).fit(plain, loader())
    seen = []

    class Raw(GradientNoiseScale):
        def _log(self, trainer, metrics, step):
            super()._log(trainer, metrics, step)
            seen.append(dict(self.last_logged))

    monitor = Raw(every_n_steps=1, ema=0.5)
    trainer(tmp_path / "b", callbacks=[monitor], max_steps=4).fit(monitored, loader())
    for a, b in zip(plain.parameters(), monitored.parameters(), strict=True):
        assert torch.equal(a, b)
    assert len(seen) == 4
    for key in ("trace_sigma", "grad_sq"):
        raw = [s[f"noise_scale/{key}"] for s in seen]
        weights = [0.5 ** (3 - i) * 0.5 for i in range(4)]
        assert seen[-1][f"noise_scale/{key}_ema"] == pytest.approx(
            sum(w * r for w, r in zip(weights, raw, strict=True)) / sum(weights), rel=1e-12)
    assert seen[-1]["noise_scale/b_simple_ema"] == pytest.approx(
        seen[-1]["noise_scale/trace_sigma_ema"] / seen[-1]["noise_scale/grad_sq_ema"], rel=1e-12)
    resumed = GradientNoiseScale(every_n_steps=1, ema=0.5)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.state_dict() == monitor.state_dict()


def test_the_two_batch_estimate_is_unbiased_for_gaussian_gradients():
    """The paper's two-batch estimator on synthetic gradients with known G and Σ: its mean over 4000 draws is
    within 4 standard errors of tr Σ and |G|² (the tolerance is stated, the draws are seeded)."""
    gen = torch.Generator().manual_seed(0)
    d, b_small, ranks, draws = 5, 4, 2, 4000
    G, scale = torch.full((d,), 0.5, dtype=torch.float64), torch.linspace(0.5, 1.5, d, dtype=torch.float64)
    g = G + scale * torch.randn(draws, ranks, b_small, d, generator=gen, dtype=torch.float64)
    local = g.mean(2)  # each rank's gradient
    small_sq, big_sq = local.square().sum(-1).mean(1), local.mean(1).square().sum(-1)
    est = two_batch_noise_scale(small_sq, big_sq, b_small, b_small * ranks)
    for values, truth in ((est.trace_sigma, float(scale.square().sum())), (est.grad_sq, float(G.square().sum()))):
        assert abs(float(values.mean()) - truth) < 4 * float(values.std()) / math.sqrt(draws)
    one = noise_scale(g.flatten(1, 2).square().sum(-1).mean(1), big_sq, b_small * ranks)
    # the one-batch estimate on the combined batch (what the monitor logs) is unbiased too, and less noisy
    assert abs(float(one.trace_sigma.mean()) - float(scale.square().sum())) < 4 * float(one.trace_sigma.std()) / 60
    assert float(one.trace_sigma.std()) < float(est.trace_sigma.std())


def test_errors(tmp_path):
    with pytest.raises(ValueError, match=r"GradientNoiseScale\(ema=1.0\): `ema` must lie in \[0, 1\)"):
        GradientNoiseScale(ema=1.0)
    with pytest.raises(ValueError, match=r"`every_n_steps` must be an integer >= 1, got 0"):
        GradientNoiseScale(every_n_steps=0)
    with pytest.raises(ValueError, match=r"`n` must be the number of samples.*got 1"):
        noise_scale(1.0, 1.0, 1)
    with pytest.raises(RuntimeError, match=r"DataGradientPenalty add\(s\) terms to the loss"):
        trainer(tmp_path, callbacks=[GradientNoiseScale(), DataGradientPenalty(0.1)], max_steps=1).fit(
            Classifier(), loader())


class SumLoss(Classifier):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1], reduction="sum")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_summed_loss_is_checked_and_measured_by_its_reduction(tmp_path, accumulate):
    """The step's gradient of a sum is B·ḡ: with loss_reduction="sum" the estimate is the mean loss's; declared
    "mean", the first batch's check names the fix."""
    torch.manual_seed(0)
    model = _double(SumLoss())
    data = dataset(32)
    data.tensors = tuple(t.double() if t.is_floating_point() else t for t in data.tensors)
    monitor = GradientNoiseScale(every_n_steps=1, ema=None, loss_reduction="sum")
    trainer(tmp_path, callbacks=[monitor], max_steps=1, accumulate_grad_batches=accumulate).fit(
        model, torch.utils.data.DataLoader(data, batch_size=8))
    want = _brute(model, data.tensors[0][: 8 * accumulate], data.tensors[1][: 8 * accumulate])
    assert monitor.last_logged == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError, match=r"GradientNoiseScale\(loss_reduction='mean'\).*behaves like a sum.*Pass "
                                         r"`loss_reduction='sum'`"):
        trainer(tmp_path, callbacks=[GradientNoiseScale(every_n_steps=1)], max_steps=1).fit(
            _double(SumLoss()), torch.utils.data.DataLoader(data, batch_size=8))


@pytest.mark.ddp
def test_under_ddp_the_two_batch_estimate_agrees_in_expectation_and_the_run_is_untouched(tmp_path):
    """160 steps at a fixed θ, 4 samples per rank: the paper's two-batch estimate (each rank's gradient against the
    all-reduced one) and the one-batch estimate on the combined 8 samples are both unbiased for tr Σ and |G|²; their
    paired per-step difference has mean 0 within 4 standard errors (the data and the run are seeded). The monitor's
    communication hook leaves DDP's training bit for bit as it is."""
    from tests.ddp import run_ddp_script

    res = run_ddp_script("noise_scale_ddp.py", tmp_path / "ns.pt")
    assert res["world_size"] == 2 and len(res["rows"]) == 160
    for key in ("trace_sigma", "grad_sq"):
        one = torch.tensor([r[f"noise_scale/{key}"] for r in res["rows"]], dtype=torch.float64)
        two = torch.tensor([r[f"noise_scale/two_batch/{key}"] for r in res["rows"]], dtype=torch.float64)
        diff = two - one
        assert float(diff.abs().max()) > 0  # two estimators, not one twice
        assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(len(diff)), key
    for k, v in res["with"].items():
        assert torch.equal(v, res["without"][k]), k
