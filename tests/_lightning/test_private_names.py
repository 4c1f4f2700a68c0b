"""The private names of torch and Lightning the package reads still exist and behave as relied upon.

Each lives behind one accessor: torch's in ``lightning_gp.functional._torch_private``, Lightning's in
``lightning_gp._lightning.private``. When a release moves one, a test here fails and names it.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from lightning_gp._lightning.private import merge_initial_hparams
from lightning_gp.functional._torch_private import tensor_version, tree_flatten, tree_map, tree_unflatten


def test_tensor_version_counts_in_place_ops():
    t = torch.zeros(3)
    assert hasattr(t, "_version"), ("torch removed Tensor._version: functional/_torch_private.tensor_version needs "
                                    "a new route")
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

    from lightning_gp._lightning.private import fabric_internal_gradients

    assert hasattr(wrappers, "_in_fabric_backward"), ("Fabric renamed its guard flag: "
                                                      "_lightning/private.fabric_internal_gradients needs a new route")
    before = wrappers._in_fabric_backward
    with fabric_internal_gradients():
        assert wrappers._in_fabric_backward is True
    assert wrappers._in_fabric_backward == before


def test_metric_update_count_accessors():
    import torchmetrics

    from lightning_gp._lightning.private import metric_update_count, set_metric_update_count

    metric = torchmetrics.SumMetric()
    metric.update(torch.tensor(2.0))
    assert metric_update_count(metric) == 1
    set_metric_update_count(metric, 0)
    assert metric.update_count == 0


def test_fabric_autocast_dtype_reads_the_wrapped_module_s_precision():
    from lightning.fabric import Fabric

    from lightning_gp._lightning.private import fabric_autocast_dtype

    for precision, want in [("bf16-mixed", torch.bfloat16), ("32-true", None)]:
        model = Fabric(accelerator="cpu", devices=1, precision=precision).setup(torch.nn.Linear(2, 2))
        assert fabric_autocast_dtype(model) == want
    assert fabric_autocast_dtype(torch.nn.Linear(2, 2)) is None


def test_batch_norm_and_dropout_bases_cover_every_variant():
    from torch import nn

    from lightning_gp.functional._layers import BATCH_NORM_LAYERS, DROPOUT_LAYERS

    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d):
        assert issubclass(cls, BATCH_NORM_LAYERS), f"torch moved _BatchNorm: {cls.__name__} is no longer under it"
    for cls in (nn.InstanceNorm1d, nn.LayerNorm, nn.GroupNorm):
        assert not issubclass(cls, BATCH_NORM_LAYERS), cls
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        assert issubclass(cls, DROPOUT_LAYERS), f"torch moved _DropoutNd: {cls.__name__} is no longer under it"


def test_conv_reversed_padding_is_what_the_conv_pads_with():
    import torch.nn.functional as F
    from torch import nn

    from lightning_gp.functional._torch_private import reversed_padding

    conv = nn.Conv2d(2, 3, (3, 5), padding=(1, 2), padding_mode="reflect")
    x = torch.randn(1, 2, 7, 9)
    assert reversed_padding(conv) == (2, 2, 1, 1), "torch changed _reversed_padding_repeated_twice"
    manual = F.conv2d(F.pad(x, reversed_padding(conv), mode="reflect"), conv.weight, conv.bias)
    torch.testing.assert_close(conv(x), manual)


def test_multihead_attention_packed_projection_flag():
    from torch import nn

    from lightning_gp.functional._torch_private import qkv_same_embed_dim

    assert qkv_same_embed_dim(nn.MultiheadAttention(8, 2)) is True, "torch renamed _qkv_same_embed_dim"
    assert qkv_same_embed_dim(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)) is False


def test_compiled_modules_are_found_through_orig_mod_and_compiler_ctx():
    from torch import nn

    from lightning_gp._lightning.private import compiled_modules
    from lightning_gp.functional._torch_private import compiled_original

    inner = nn.Linear(2, 2)
    compiled = torch.compile(inner)
    assert compiled_original(compiled) is inner, "torch's OptimizedModule no longer keeps _orig_mod"
    assert compiled_original(inner) is None
    assert compiled_modules(nn.Sequential(compiled)) == ["0"]


def test_lightning_logging_internals():
    from lightning_gp._lightning.private import batches_that_stepped, will_write_logs

    trainer = pl.Trainer(log_every_n_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    assert will_write_logs(trainer) in (True, False), "Lightning moved _logger_connector.should_update_logs"
    assert batches_that_stepped(trainer) == 0, "Lightning moved fit_loop.epoch_loop._batches_that_stepped"


def test_callback_state_key_is_lightnings_own():
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_gp._lightning.private import callback_state_key

    stop = EarlyStopping(monitor="loss")
    assert callback_state_key(stop, monitor="loss", mode="min") == stop.state_key


def test_logger_prefix_is_what_the_logger_writes_before_its_keys(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_gp._lightning.private import logger_prefix

    assert logger_prefix(CSVLogger(tmp_path, prefix="exp")) == "exp", "Lightning moved the loggers' _prefix"
    assert logger_prefix(CSVLogger(tmp_path)) == ""
