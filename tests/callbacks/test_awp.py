"""AdversarialWeightPerturbation against the authors' step (tests/robust_loops.py: a proxy copy, one SGD step of
−loss, ‖W‖-scaled per-layer diffs, W + γ·v for the step, −γ·v after it), on PGD-AT, TRADES and MART, float64, SGD with
momentum and weight decay; the order of the withdrawal; accumulation; the refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import MART, TRADES, AdversarialTraining, AdversarialWeightPerturbation, SharpnessAwareMinimization
from lightning_gp import functional as LF
from lightning_gp.functional._rng import seeded_generator
from lightning_gp.step._chain import ORDER
from tests.robust_loops import add_into_weights, awp_diff, trades_x_adv

STEPS, BATCH, SEED, EPS, GAMMA = 4, 16, 3, 0.1, 0.05
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class Net(pl.LightningModule):
    """No BatchNorm or dropout: the order of the passes does not matter, only the weights they run at."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Softplus(), nn.Linear(16, 4))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
        self.double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        # a large weight decay: it acts on W + v in the authors' order, which the tests tell apart from SAM's
        return torch.optim.SGD(self.parameters(), lr=0.2, momentum=0.9, weight_decay=0.05)


def data(n: int = STEPS * BATCH) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).argmax(1))


def fit(callbacks, n_steps: int = STEPS, **kwargs) -> Net:
    model = Net()
    pl.seed_everything(SEED, verbose=False)
    batch = kwargs.pop("batch_size", BATCH)
    pl.Trainer(max_steps=n_steps, precision="64-true", callbacks=callbacks, **QUIET | kwargs).fit(
        model, DataLoader(data(), batch_size=batch))
    return model


def pgd_by_hand(model: nn.Module, x, y, steps: int = 3):
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x + (x_adv.detach() + EPS / 4 * g.sign() - x).clamp(-EPS, EPS)).clamp(0, 1)
    return x_adv.detach()


def adversarial_point(method: str, net: nn.Module, x, y, gen: torch.Generator):
    """x' as each method finds it at W: PGD from x (no random start), TRADES's and MART's eval-mode ascents."""
    if method == "pgd":
        return pgd_by_hand(net, x, y)
    net.eval()
    try:
        if method == "trades":
            return trades_x_adv(net, x, EPS, EPS / 4, 3, gen)
        return LF.mart_adversarial(net, x, y, EPS, steps=3, generator=gen)
    finally:
        net.train()


def adversarial_loss(method: str, mod: nn.Module, x, y, x_adv):
    """The objective each method trains on at x' (the authors' proxy loss, and the loss of the step at W + v)."""
    if method == "pgd":
        return F.cross_entropy(mod(x_adv), y)
    if method == "trades":
        return F.cross_entropy(mod(x), y) + 6.0 * F.kl_div(F.log_softmax(mod(x_adv), 1), F.softmax(mod(x), 1),
                                                             reduction="batchmean")
    boosted, kl = LF.mart_terms(mod(x), mod(x_adv), y)
    return boosted + 6.0 * kl


def by_hand(method: str, *, withdraw_before_step: bool = False, micro: int = 1) -> Net:
    """The authors' AT-AWP / TRADES-AWP step (and MART with AWP by the same recipe)."""
    model = Net()
    opt = model.configure_optimizers()
    x_all, y_all = data().tensors
    size = BATCH // micro
    for t in range(STEPS // micro):
        opt.zero_grad()
        diff = None
        for m in range(micro):
            i = (t * micro + m) * size
            x, y = x_all[i:i + size], y_all[i:i + size]
            gen = None if method == "pgd" else seeded_generator("cpu", SEED, 0, t, m, ORDER[method.upper()])
            x_adv = adversarial_point(method, model.net, x, y, gen)
            if diff is None:  # the step's first micro-batch finds v; the rest train at W + v
                diff = awp_diff(model.net, lambda mod, x=x, y=y, x_adv=x_adv: adversarial_loss(method, mod, x, y,
                                                                                                 x_adv))
                add_into_weights(model.net, diff, GAMMA)
            (adversarial_loss(method, model.net, x, y, x_adv) / micro).backward()
        if withdraw_before_step:  # SAM's order, for contrast
            add_into_weights(model.net, diff, -GAMMA)
        opt.step()
        if not withdraw_before_step:
            add_into_weights(model.net, diff, -GAMMA)
    return model


def adversarial(method: str):
    if method == "pgd":
        return AdversarialTraining(EPS, norm="linf", steps=3, step_size=EPS / 4, clamp=(0.0, 1.0))
    if method == "trades":
        return TRADES(EPS, 6.0, steps=3)
    return MART(EPS, 6.0, steps=3)


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


@pytest.mark.parametrize("method", ["pgd", "trades", "mart"])
def test_awp_equals_the_authors_step(method):
    """4 SGD steps (momentum, weight decay) at W + γ·v, v from the proxy step on the adversarial loss; v off after."""
    got = fit([adversarial(method), AdversarialWeightPerturbation(GAMMA)])
    want = by_hand(method)
    assert max_diff(got, want) < 1e-9
    assert max_diff(want, fit([adversarial(method)])) > 1e-3  # AWP changed the training


def test_weight_decay_acts_on_the_moved_weights_as_the_authors_have_it():
    """SAM's order (v off before the step) differs by lr·wd·v: the two are told apart, and ours is the authors'."""
    got = fit([adversarial("pgd"), AdversarialWeightPerturbation(GAMMA)])
    sam_order = by_hand("pgd", withdraw_before_step=True)
    assert max_diff(got, by_hand("pgd")) < 1e-9 and max_diff(got, sam_order) > 1e-6


def test_under_accumulation_v_is_found_once_a_step_and_held_through_it():
    got = fit([adversarial("pgd"), AdversarialWeightPerturbation(GAMMA)], n_steps=STEPS // 2,
              accumulate_grad_batches=2, batch_size=BATCH // 2)
    assert max_diff(got, by_hand("pgd", micro=2)) < 1e-9


def test_the_weights_are_back_after_every_step_and_the_gap_is_logged():
    seen = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.net[0].weight.detach().clone())

    awp = AdversarialWeightPerturbation(GAMMA)
    model = Net()
    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(max_steps=2, precision="64-true", callbacks=[adversarial("pgd"), awp, Watch()], **QUIET)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    assert awp._held is None and len(seen) == 2
    assert float(trainer.callback_metrics["adversarial/awp_gap_epoch"]) > 0  # moving against the loss raises it


def test_functional_perturbation_is_gamma_times_the_weight_norm_along_the_gradient():
    net = Net().net
    params = LF.awp_parameters(net.named_parameters())
    assert [tuple(p.shape) for p in params] == [(16, 6), (16, 16), (4, 16)]
    grads = [torch.randn_like(p) for p in params]
    for p, g, v in zip(params, grads, LF.awp_perturbation(params, grads, 0.01), strict=True):
        torch.testing.assert_close(v.norm(), 0.01 * p.norm(), rtol=1e-12, atol=0)
        torch.testing.assert_close(F.cosine_similarity(v.flatten(), g.flatten(), dim=0),
                                   torch.tensor(1.0, dtype=torch.float64))


def test_refused_alone_and_beside_sam():
    with pytest.raises(ValueError, match="add one of"):
        fit([AdversarialWeightPerturbation(GAMMA)])
    with pytest.raises(ValueError, match="both perturb the weights"):
        fit([adversarial("pgd"), AdversarialWeightPerturbation(GAMMA), SharpnessAwareMinimization(0.05)])


@pytest.mark.parametrize(("kwargs", "match"), [({"gamma": -1.0}, "`gamma`"), ({"params": "biases"}, "`params`")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdversarialWeightPerturbation(**kwargs)


def test_trades_with_awp_resumes_bit_identically(tmp_path):
    """Checkpoints are written with v withdrawn (after the step), and v is a function of the weights and the batch."""
    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs, precision="64-true", callbacks=[TRADES(EPS, steps=2),
                          AdversarialWeightPerturbation(GAMMA)], **QUIET)

    def loader() -> DataLoader:
        return DataLoader(data(2 * BATCH), batch_size=BATCH)

    pl.seed_everything(SEED, verbose=False)
    straight = Net()
    trainer(2).fit(straight, loader())
    pl.seed_everything(SEED, verbose=False)
    first = trainer(1)
    first.fit(Net(), loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    resumed = Net()
    trainer(2).fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_bf16_mixed_trains_with_finite_values():
    model = Net().float()
    before = model.net[0].weight.detach().clone()
    trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", callbacks=[TRADES(EPS, steps=2),
                         AdversarialWeightPerturbation(GAMMA)], **QUIET)
    x, y = data().tensors
    trainer.fit(model, DataLoader(TensorDataset(x.float(), y), batch_size=BATCH))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(model.net[0].weight, before)


@pytest.mark.parametrize("beside", [
    lambda: AdversarialTraining(EPS, steps=2, average_steps=True),
    lambda: AdversarialTraining(EPS, eps_relative=True),
], ids=["freelb", "eps_relative"])
def test_refused_at_setup_beside_an_adversarial_training_that_does_not_announce_its_objective(beside):
    with pytest.raises(ValueError, match="announces on the batch input only"):
        fit([beside(), AdversarialWeightPerturbation(GAMMA)])
