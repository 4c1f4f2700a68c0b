"""Lightning Fabric: `penalized_loss` on the module `fabric.setup` returns, in every precision Fabric runs on CPU,
equals the same computation on the unwrapped module (in the dtype, or under the autocast, Fabric uses)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric

from lightning_gp import AdversarialTraining, DataGradientPenalty, ParameterGradientPenalty, penalized_loss

CALLBACKS = {
    "data_double_backward": lambda: DataGradientPenalty(0.1, method="double_backward"),
    "data_finite_difference": lambda: DataGradientPenalty(0.1, method="finite_difference"),
    "parameter_double_backward": lambda: ParameterGradientPenalty(0.1, method="double_backward"),
    "parameter_finite_difference": lambda: ParameterGradientPenalty(0.1, method="finite_difference"),
    "pgd": lambda: AdversarialTraining(0.1, steps=2),
}
PRECISIONS = {  # Fabric's precision → how the plain reference runs: (parameter dtype, autocast dtype or None)
    "32-true": (torch.float32, None),
    "64-true": (torch.float64, None),
    "bf16-true": (torch.bfloat16, None),
    "bf16-mixed": (torch.float32, torch.bfloat16),
}


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, optimizer, backward, dtype, autocast, callback, steps=3):
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 4, generator=g).to(dtype), torch.randint(0, 3, (8,), generator=g)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = penalized_loss(model, lambda b: F.cross_entropy(model(b[0]).float(), b[1]), (x, y), [callback])
        optimizer.zero_grad()
        backward(loss)
        optimizer.step()


@pytest.mark.parametrize("precision", list(PRECISIONS))
@pytest.mark.parametrize("name", list(CALLBACKS))
def test_penalized_loss_in_a_fabric_loop_equals_the_plain_loop(name, precision):
    dtype, autocast = PRECISIONS[precision]
    fabric = Fabric(accelerator="cpu", devices=1, precision=precision)
    net = _net()
    plain = copy.deepcopy(net).to(dtype)
    model, optimizer = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    # Fabric autocasts inside the module's forward; the plain loop puts the same autocast around the step
    _train(model, optimizer, fabric.backward, dtype, None, CALLBACKS[name]())
    _train(plain, torch.optim.SGD(plain.parameters(), lr=0.1), lambda loss: loss.backward(), dtype, autocast,
           CALLBACKS[name]())
    for (key, a), b in zip(model.module.named_parameters(), plain.parameters(), strict=True):
        assert type(a) is torch.nn.Parameter and a.requires_grad  # the finite difference left them as they were
        torch.testing.assert_close(a.to(torch.float64), b.to(torch.float64), rtol=0, atol=0, msg=key)
