"""DataGradientPenalty: its finite difference, precision, batch forms, reductions and errors (the matrices it shares
with the other callbacks are in tests/integration/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.callbacks import (
    DataGradientPenalty,
)
from tests.callbacks.test_errors import ce, run
from tests.callbacks.test_features import Module, bn_net, fit
from tests.integration.test_exactness import BATCH, STEPS, dataset, hand_run, make_net
from tests.integration.test_exactness import data_penalty_obj as hand_data_penalty


def test_finite_difference_replays_dropout_masks():
    """With different masks in the two passes the difference quotient would be noise of size 1/h."""
    def update(method):
        net = bn_net(dropout=0.3)
        start = [p.detach().clone() for p in net.parameters()]
        torch.manual_seed(7)
        fit(Module(net), [DataGradientPenalty(2.0, method=method)], steps=1, precision="64-true")
        return torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(net.parameters(), start, strict=True)])

    exact, fd = update("double_backward"), update("finite_difference")
    assert (fd - exact).norm() / exact.norm() < 2e-2


def test_bf16_mixed_matches_autocast_loop():
    def run_lightning():
        net = make_net().float()
        ds = TensorDataset(dataset().tensors[0].float(), dataset().tensors[1])
        fit(Module(net), [DataGradientPenalty(0.5)], loader=DataLoader(ds, batch_size=BATCH), precision="bf16-mixed")
        return net.state_dict()

    def hand(net, x, y, t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hand_data_penalty(net, x.float(), y, 0.5)

    got = run_lightning()
    net0 = make_net().float()
    import tests.integration.test_exactness as ex

    orig = ex.make_net
    ex.make_net = lambda: net0
    try:
        expected = hand_run(hand)
    finally:
        ex.make_net = orig
    start = make_net().float().state_dict()
    for key, value in expected.items():
        moved = (value - start[key]).abs().max()
        assert (got[key] - value).abs().max() <= 0.05 * moved + 1e-3, key


def test_dict_batch_and_callable_input_key_match_tuple_batch():
    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return STEPS * BATCH

        def __getitem__(self, i):
            x, y = dataset()[i]
            return {"inputs": x, "target": y}

    expected = hand_run(lambda n, x, y, t: hand_data_penalty(n, x, y, 0.5))
    for key in (None, "inputs", lambda b: b["inputs"]):
        module = Module(make_net(), batch_format="dict")
        fit(module, [DataGradientPenalty(0.5, input_key=key)], loader=DataLoader(DictData(), batch_size=BATCH),
            precision="64-true")
        for name, value in expected.items():
            torch.testing.assert_close(module.net.state_dict()[name], value, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_penalty_is_per_sample_whatever_the_reduction(method):
    """A mean-reduced and a sum-reduced training_step give the same per-sample penalty when declared."""
    class Summed(Module):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1], reduction="sum")

    values = []
    for cls, reduction in ((Module, "mean"), (Summed, "sum")):
        trainer = fit(cls(make_net()), [DataGradientPenalty(0.5, method=method, loss_reduction=reduction)], steps=1,
                      precision="64-true")
        values.append(trainer.callback_metrics["penalty/data_gradient"])
    expected = hand_data_penalty(make_net(), *dataset()[:BATCH], 1.0) - F.cross_entropy(
        make_net()(dataset()[:BATCH][0]), dataset()[:BATCH][1])
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(values[0], expected.detach(), rtol=1e-10, atol=0)


def test_loss_not_depending_on_input():
    with pytest.raises(ValueError, match="does not depend on the input selected by `input_key=None`"):
        run(lambda m, b: m.net.weight.square().sum(), DataGradientPenalty(1.0))


def test_unresolvable_input_key_in_a_run():
    with pytest.raises(ValueError, match=r"input_key='image'.*Batch: \[Tensor\[4, 4\], Tensor\[4\]"):
        run(ce, DataGradientPenalty(1.0, input_key="image"))


def test_summed_loss_declared_as_mean_is_caught():
    with pytest.raises(ValueError, match=r"loss_reduction='mean'\): `training_step` returned a loss that behaves like "
                                         r"a sum.*Pass `loss_reduction='sum'`"):
        run(lambda m, b: F.cross_entropy(m.net(b[0]), b[1], reduction="sum"), DataGradientPenalty(1.0))
    with pytest.raises(ValueError, match=r"behaves like a mean.*Pass `loss_reduction='mean'`"):
        run(ce, DataGradientPenalty(1.0, loss_reduction="sum"))
    summed = lambda m, b: F.cross_entropy(m.net(b[0]), b[1], reduction="sum")  # noqa: E731
    run(summed, DataGradientPenalty(1.0, check_reduction=False))  # intended: no error
