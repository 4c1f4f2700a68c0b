"""ParameterGradientPenalty: what it does on a model it cannot penalise (its exactness, DDP scopes and finite difference
are in tests/integration/)."""

from __future__ import annotations

import pytest

from lightning_gp.callbacks import (
    ParameterGradientPenalty,
)
from tests.integration.test_fuzz_lightning import Net, fit, left_behind


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
def test_parameter_penalty_on_a_fully_frozen_model_says_so(method):
    module = Net()
    module.net.requires_grad_(False)
    with pytest.raises(ValueError, match=r"ParameterGradientPenalty: `Net` has no parameter that requires grad at "
                                         r"global step 0 \(all frozen\?\).*Unfreeze"):
        fit(module, [ParameterGradientPenalty(0.1, method=method)], steps=1)
    module.net.requires_grad_(True)
    assert left_behind(module) == []
