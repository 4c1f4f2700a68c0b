"""The torch/Lightning internals behind lightning_gp._compat still exist and behave as relied upon."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_gp._compat import merge_initial_hparams, tensor_version, tree_flatten, tree_map, tree_unflatten


def test_tensor_version_counts_in_place_ops():
    t = torch.zeros(3)
    assert hasattr(t, "_version"), "torch removed Tensor._version: _compat.tensor_version needs a new route"
    before = tensor_version(t)
    t.add_(1)
    assert tensor_version(t) == before + 1
    _ = t + 1  # out of place: no bump
    assert tensor_version(t) == before + 1


def test_pytree_round_trip():
    tree = ((torch.ones(1), 2), {"a": torch.zeros(2)})
    flat, spec = tree_flatten(tree)
    assert len(flat) == 3
    rebuilt = tree_unflatten(flat, spec)
    assert rebuilt[0][1] == 2 and torch.equal(rebuilt[1]["a"], torch.zeros(2))
    doubled = tree_map(lambda v: v * 2 if isinstance(v, torch.Tensor) else v, tree)
    assert torch.equal(doubled[0][0], torch.full((1,), 2.0))


class _Module(pl.LightningModule):
    def __init__(self, **kwargs):
        super().__init__()
        if kwargs:
            self.save_hyperparameters(kwargs, logger=False)


def test_merge_initial_hparams_reaches_hparams_initial():
    module = _Module()
    merge_initial_hparams(module, {"lr": 0.1})
    assert module.hparams["lr"] == 0.1
    assert module.hparams_initial["lr"] == 0.1, "Lightning no longer reads hparams_initial from _hparams_initial"


def test_merge_initial_hparams_keeps_the_users_values_and_logger_choice():
    module = _Module(lr=0.5)
    merge_initial_hparams(module, {"lr": 0.1, "n_critic": 5})
    assert module.hparams["lr"] == 0.5 and module.hparams_initial["lr"] == 0.5
    assert module.hparams_initial["n_critic"] == 5
    assert module._log_hyperparams is False


def test_fabric_s_backward_guard_flag_exists_and_is_restored():
    import lightning.fabric.wrappers as wrappers

    from lightning_gp._compat import fabric_internal_gradients

    assert hasattr(wrappers, "_in_fabric_backward"), "Fabric renamed its guard flag: _compat needs a new route"
    before = wrappers._in_fabric_backward
    with fabric_internal_gradients():
        assert wrappers._in_fabric_backward is True
    assert wrappers._in_fabric_backward == before


def test_metric_update_count_accessors():
    import torchmetrics

    from lightning_gp._compat import metric_update_count, set_metric_update_count

    metric = torchmetrics.SumMetric()
    metric.update(torch.tensor(2.0))
    assert metric_update_count(metric) == 1
    set_metric_update_count(metric, 0)
    assert metric.update_count == 0


def test_fabric_autocast_dtype_reads_the_wrapped_module_s_precision():
    from lightning.fabric import Fabric

    from lightning_gp._compat import fabric_autocast_dtype

    for precision, want in [("bf16-mixed", torch.bfloat16), ("32-true", None)]:
        model = Fabric(accelerator="cpu", devices=1, precision=precision).setup(torch.nn.Linear(2, 2))
        assert fabric_autocast_dtype(model) == want
    assert fabric_autocast_dtype(torch.nn.Linear(2, 2)) is None
