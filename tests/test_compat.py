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
