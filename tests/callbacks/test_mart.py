"""MART against the authors' training step (tests/robust_loops.py), float64, SGD with momentum, the BatchNorm model of
test_trades.py; the clean pass read off the user's own step; the refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_gp import MART, TRADES, AdversarialTraining
from lightning_gp import functional as LF
from lightning_gp.functional._rng import seeded_generator
from lightning_gp.step._chain import ORDER
from tests.callbacks.test_trades import BATCH, QUIET, SEED, STEPS, BNNet, assert_same, data
from tests.robust_loops import mart_step_loss


def generator(step: int) -> torch.Generator:
    """MART's documented draw: (the run's seed, rank, global step, micro-batch, its place in the chain)."""
    return seeded_generator("cpu", SEED, 0, step, 0, ORDER["MART"])


def fit(callbacks, model=None, n_steps: int = STEPS) -> BNNet:
    model = BNNet() if model is None else model
    pl.seed_everything(SEED, verbose=False)
    pl.Trainer(max_steps=n_steps, precision="64-true", callbacks=callbacks, **QUIET).fit(
        model, DataLoader(data(), batch_size=BATCH))
    return model


def by_hand(eps: float, beta: float, steps: int, n_steps: int = STEPS) -> BNNet:
    model = BNNet()
    opt = model.configure_optimizers()
    x_all, y_all = data().tensors
    for t in range(n_steps):
        x, y = x_all[t * BATCH:(t + 1) * BATCH], y_all[t * BATCH:(t + 1) * BATCH]
        opt.zero_grad()
        mart_step_loss(model.net, x, y, eps, beta, eps / 4, steps, generator(t)).backward()
        opt.step()
    return model


@pytest.mark.parametrize(("eps", "beta", "steps"), [(0.1, 6.0, 10), (0.3, 1.0, 3)])
def test_mart_equals_the_authors_step(eps, beta, steps):
    """Parameters and BatchNorm statistics after 4 SGD-momentum steps: the user's own forward is the authors' clean
    pass (two train-mode passes a step, x then x'), and MART's loss replaces the step's."""
    assert_same(fit([MART(eps, beta, steps=steps)]), by_hand(eps, beta, steps))


class ViaNet(BNNet):
    """A step that calls `self.net(x)`, not `self(x)`: MART cannot read its logits and makes its own clean pass."""

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])


def test_a_step_that_does_not_call_self_gets_its_own_clean_pass():
    """One step: the authors' update; the BatchNorm statistics moved once more (the extra clean pass), which the next
    step's eval-mode attack would then see."""
    got = fit([MART(0.1, 6.0, steps=3)], model=ViaNet(), n_steps=1)
    want = by_hand(0.1, 6.0, 3, n_steps=1)
    for key in ("net.0.weight", "net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"):
        torch.testing.assert_close(got.state_dict()[key], want.state_dict()[key], atol=1e-9, rtol=0)
    assert not torch.allclose(got.net[1].running_mean, want.net[1].running_mean, atol=1e-6)


def test_functional_mart_loss_equals_the_authors_loss():
    x, y = data(BATCH).tensors
    model, twin = BNNet().net, BNNet().net
    ours = LF.mart_loss(model, x, y, 0.1, 6.0, steps=5, generator=generator(0))
    theirs = mart_step_loss(twin, x, y, 0.1, 6.0, 0.025, 5, generator(0))
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    for a, b in zip(torch.autograd.grad(ours, list(model.parameters())),
                    torch.autograd.grad(theirs, list(twin.parameters())), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_terms_are_logged():
    model = BNNet()
    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(max_steps=2, precision="64-true", callbacks=[MART(0.1, steps=2)], **QUIET)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    assert float(trainer.callback_metrics["adversarial/mart_boosted_ce_epoch"]) > 0
    assert float(trainer.callback_metrics["adversarial/mart_kl_epoch"]) >= 0


@pytest.mark.parametrize("other", [lambda: AdversarialTraining(0.1), lambda: TRADES(0.1)])
def test_refused_beside_a_callback_on_the_same_loss(other):
    with pytest.raises(ValueError, match=r"MART replaces the loss|TRADES adds its KL"):
        fit([MART(0.1), other()])


def test_a_batch_without_labels_is_refused_with_target_key_as_the_fix():
    class Unlabelled(BNNet):
        def training_step(self, batch, batch_idx):
            return self(batch["x"]).logsumexp(1).mean()

    loader = DataLoader([{"x": x} for x in data().tensors[0]], batch_size=BATCH)
    trainer = pl.Trainer(max_steps=1, precision="64-true", callbacks=[MART(0.1, steps=1)], **QUIET)
    with pytest.raises(ValueError, match=r"MART needs integer class labels.*target_key="):
        trainer.fit(Unlabelled(), loader)


# ---- TRADES and MART under gradient accumulation, bf16-mixed and resume -----------------------------------------

LOOPS = {"TRADES": (TRADES, "trades"), "MART": (MART, "mart")}


def by_hand_accumulated(name: str, micro: int) -> BNNet:
    from tests.robust_loops import trades_step_loss

    step_loss = trades_step_loss if name == "TRADES" else mart_step_loss
    model = BNNet()
    opt = model.configure_optimizers()
    x_all, y_all = data().tensors
    size = BATCH // micro
    for t in range(STEPS // micro):
        opt.zero_grad()
        for m in range(micro):
            i = (t * micro + m) * size
            gen = seeded_generator("cpu", SEED, 0, t, m, ORDER[name])
            (step_loss(model.net, x_all[i:i + size], y_all[i:i + size], 0.1, 6.0, 0.025, 3, gen) / micro).backward()
        opt.step()
    return model


@pytest.mark.parametrize("name", list(LOOPS))
def test_gradient_accumulation_equals_the_authors_step_per_micro_batch(name):
    """accumulate_grad_batches=2: each micro-batch is the authors' step on its half, the losses halved and summed."""
    model = BNNet()
    pl.seed_everything(SEED, verbose=False)
    pl.Trainer(max_steps=STEPS // 2, precision="64-true", accumulate_grad_batches=2,
               callbacks=[LOOPS[name][0](0.1, 6.0, steps=3)], **QUIET).fit(
        model, DataLoader(data(), batch_size=BATCH // 2))
    assert_same(model, by_hand_accumulated(name, 2))


@pytest.mark.parametrize("name", list(LOOPS))
def test_bf16_mixed_trains_with_finite_values(name):
    model = BNNet().float()
    before = model.net[0].weight.detach().clone()
    trainer = pl.Trainer(max_steps=2, precision="bf16-mixed", callbacks=[LOOPS[name][0](0.1, steps=2)], **QUIET)
    x, y = data().tensors
    trainer.fit(model, DataLoader(torch.utils.data.TensorDataset(x.float(), y), batch_size=BATCH))
    assert trainer.global_step == 2 and all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not torch.equal(model.net[0].weight, before)


@pytest.mark.parametrize("name", list(LOOPS))
def test_checkpoint_resume_is_bit_identical(name, tmp_path):
    """2 epochs straight == 1 epoch, save, resume: parameters and BatchNorm statistics bit-identical (the random
    starts are a function of the run's seed and the step)."""
    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs, precision="64-true", callbacks=[LOOPS[name][0](0.1, steps=2)], **QUIET)

    def loader() -> DataLoader:
        return DataLoader(data(2 * BATCH), batch_size=BATCH)

    pl.seed_everything(SEED, verbose=False)
    straight = BNNet()
    trainer(2).fit(straight, loader())
    pl.seed_everything(SEED, verbose=False)
    first = trainer(1)
    first.fit(BNNet(), loader())
    first.save_checkpoint(tmp_path / "half.ckpt")
    torch.manual_seed(123)  # another process seed: the checkpoint's run seed must win
    resumed = BNNet()
    second = trainer(2)
    second.fit(resumed, loader(), ckpt_path=tmp_path / "half.ckpt")
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_token_ids_are_refused_with_the_callbacks_that_take_a_layer():
    class Tokens(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(10, 4), torch.nn.Linear(4, 3)

        def forward(self, ids):
            return self.head(self.emb(ids).mean(1))

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = [(torch.randint(0, 10, (5,)), torch.tensor(1)) for _ in range(8)]
    with pytest.raises(TypeError, match=r"MART perturbs the batch input.*TRADES\(target=\.\.\.\)"):
        pl.Trainer(max_steps=1, callbacks=[MART(0.1)], **QUIET).fit(Tokens(), DataLoader(data, batch_size=4))
