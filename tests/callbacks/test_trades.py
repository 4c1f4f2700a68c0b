"""TRADES against the authors' training step (tests/robust_loops.py), float64, SGD with momentum, a BatchNorm model
whose eval-mode running statistics decide x'; its layer target; its refusals."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import TRADES, AdversarialTraining
from lightning_gp import functional as LF
from lightning_gp.functional._rng import seeded_generator
from lightning_gp.step._chain import ORDER
from tests.robust_loops import trades_step_loss, trades_x_adv

STEPS, BATCH, SEED = 4, 16, 7
QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


class BNNet(pl.LightningModule):
    """Linear → BatchNorm → ReLU → Linear: x' depends on the running statistics (eval mode), the loss on the batch's."""

    def __init__(self, lr: float = 0.2) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights every time, the run's seed left alone
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).double()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def data(n: int = STEPS * BATCH) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 6, generator=g, dtype=torch.float64)
    return TensorDataset(x, (x[:, :4] * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)).argmax(1))


def generator(step: int) -> torch.Generator:
    """The callback's documented draw: (the run's seed, rank, global step, micro-batch, its place in the chain)."""
    return seeded_generator("cpu", SEED, 0, step, 0, ORDER["TRADES"])


def fit(callbacks, **kwargs) -> BNNet:
    model = BNNet()
    pl.seed_everything(SEED, verbose=False)  # the run's seed: the base of the callback's draws
    trainer = pl.Trainer(max_steps=STEPS, precision="64-true", callbacks=callbacks, **QUIET | kwargs)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    return model


def by_hand(eps: float, beta: float, step_size: float, steps: int) -> BNNet:
    model = BNNet()
    opt = model.configure_optimizers()
    x_all, y_all = data().tensors
    for t in range(STEPS):
        x, y = x_all[t * BATCH:(t + 1) * BATCH], y_all[t * BATCH:(t + 1) * BATCH]
        opt.zero_grad()
        trades_step_loss(model.net, x, y, eps, beta, step_size, steps, generator(t)).backward()
        opt.step()
    return model


def assert_same(got: nn.Module, want: nn.Module) -> None:
    initial = BNNet().state_dict()
    for key, value in got.state_dict().items():
        torch.testing.assert_close(value, want.state_dict()[key], atol=1e-9, rtol=0, msg=key)
    assert max(float((v - initial[k]).abs().max()) for k, v in want.state_dict().items()
               if v.is_floating_point()) > 1e-2  # it trained


@pytest.mark.parametrize(("eps", "beta", "steps"), [(0.1, 6.0, 10), (0.3, 1.0, 3)])
def test_trades_equals_the_authors_step(eps, beta, steps):
    """Parameters and BatchNorm statistics after 4 SGD-momentum steps: equal to the authors' loop (eval-mode x',
    the passes x, x', x in train mode)."""
    got = fit([TRADES(eps, beta, steps=steps)])
    assert_same(got, by_hand(eps, beta, eps / 4, steps))


def test_functional_trades_loss_equals_the_authors_loss():
    model, x, y = BNNet().net, *data(BATCH).tensors
    ours = LF.trades_loss(model, x, y, 0.1, 6.0, steps=5, generator=generator(0))
    theirs = trades_step_loss(BNNet().net, x, y, 0.1, 6.0, 0.025, 5, generator(0))
    torch.testing.assert_close(ours, theirs, atol=1e-12, rtol=0)
    g_ours = torch.autograd.grad(ours, list(model.parameters()))
    twin = BNNet().net
    g_theirs = torch.autograd.grad(trades_step_loss(twin, x, y, 0.1, 6.0, 0.025, 5, generator(0)),
                                   list(twin.parameters()))
    for a, b in zip(g_ours, g_theirs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    assert model.training  # put back in train mode, as found


def test_adversarial_point_stays_in_the_ball_and_box_and_raises_the_kl():
    model, (x, _) = BNNet().net.eval(), data(BATCH).tensors
    x_adv = LF.trades_adversarial(model, x, 0.1, steps=10, generator=generator(0))
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-12 and float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    torch.testing.assert_close(x_adv, trades_x_adv(model, x, 0.1, 0.025, 10, generator(0)), atol=1e-12, rtol=0)
    clean = model(x)
    noise = (x + 1e-3 * torch.randn(x.shape, generator=generator(1), dtype=x.dtype)).clamp(0, 1)
    assert float(LF.trades_kl(clean, model(x_adv))) > 10 * float(LF.trades_kl(clean, model(noise)))


def test_l2_inner_maximisation_keeps_the_ball_and_the_box():
    model, (x, _) = BNNet().net.eval(), data(BATCH).tensors
    x_adv = LF.trades_adversarial(model, x, 0.5, norm="l2", steps=10, generator=generator(0))
    assert float((x_adv - x).flatten(1).norm(dim=1).max()) <= 0.5 + 1e-9
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_logged_kl_is_the_kl_the_loss_carries():
    cb = TRADES(0.1, 6.0, steps=3)
    model = BNNet()
    pl.seed_everything(SEED, verbose=False)
    trainer = pl.Trainer(max_steps=2, precision="64-true", callbacks=[cb], **QUIET)
    trainer.fit(model, DataLoader(data(), batch_size=BATCH))
    assert float(trainer.callback_metrics["adversarial/trades_kl_epoch"]) > 0


def test_attack_mode_train_differs_from_eval_on_a_batchnorm_model():
    assert not torch.equal(fit([TRADES(0.1, steps=3, attack_mode="train")]).net[0].weight,
                           fit([TRADES(0.1, steps=3)]).net[0].weight)


def test_refused_beside_adversarial_training():
    with pytest.raises(ValueError, match="TRADES adds its KL to the clean loss, and AdversarialTraining trains on"):
        fit([TRADES(0.1), AdversarialTraining(0.1)])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"eps": -0.1}, r"`eps`"), ({"eps": 0.1, "beta": -1.0}, r"`weight`|`beta`"),
    ({"eps": 0.1, "norm": "l1"}, r"`norm`"), ({"eps": 0.1, "attack_mode": "test"}, r"`attack_mode`"),
    ({"eps": 0.1, "steps": 0}, r"`steps`"), ({"eps": 0.1, "target": "net.0"}, r"bounds=None"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        TRADES(**kwargs)


def test_inputs_outside_the_bounds_are_refused_with_the_fix():
    """Normalized images are not in [0, 1]: clipping x' into a box x is not in would be silently wrong."""
    x, y = data().tensors
    model = BNNet()
    trainer = pl.Trainer(max_steps=1, precision="64-true", callbacks=[TRADES(0.1, steps=1)], **QUIET)
    with pytest.raises(ValueError, match=r"`x` must lie inside `bounds` = \(0.0, 1.0\).*Pass the range"):
        trainer.fit(model, DataLoader(TensorDataset(x * 4 - 2, y), batch_size=BATCH))
