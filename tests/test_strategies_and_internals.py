"""Strategies the package refuses, and the Lightning internals it reads (in one place each)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    GradientNormMonitor,
    MLPInequalityMonitor,
    ParameterGradientPenalty,
    SpectralNormMonitor,
    SpectralNormPenalty,
)
from lightning_gp._logging import logger_step, should_log
from lightning_gp._setup_checks import check_strategy
from lightning_gp.functional._torch_private import tensor_version
from tests.test_callbacks_exactness import make_net
from tests.test_callbacks_features import Module, fit

CALLBACKS = [
    lambda: DataGradientPenalty(0.5),
    lambda: ParameterGradientPenalty(0.1),
    lambda: AdversarialTraining(0.1),
    lambda: SpectralNormPenalty(0.1),
    lambda: GradientNormMonitor(),
    lambda: GradientNormMonitor(mode="fused"),
    lambda: MLPInequalityMonitor(),
    lambda: SpectralNormMonitor(),
]
NAMES = ["data", "parameter", "adversarial", "spectral", "grad_norm", "fused", "mlp", "sigma"]


@pytest.fixture
def no_process_group_left():
    """ModelParallelStrategy initialises a (1-process) process group in this process before `setup`."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.usefixtures("no_process_group_left")
@pytest.mark.parametrize("make", CALLBACKS, ids=NAMES)
def test_model_parallel_strategy_is_refused_in_setup(make):
    callback = make()
    with pytest.raises(RuntimeError, match=rf"{type(callback).__name__} does not support `ModelParallelStrategy`.*"
                                           r"Supported: SingleDeviceStrategy.*DDPStrategy"):
        fit(Module(make_net()), [callback], steps=1, strategy=ModelParallelStrategy(), accelerator="cpu", devices=1)


class DeepSpeedStrategy(DDPStrategy):
    """DeepSpeedStrategy subclasses DDPStrategy and cannot be built without `deepspeed`: a stand-in by name."""


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy], ids=["fsdp", "deepspeed"])
def test_fsdp_and_deepspeed_are_refused(strategy):
    # Lightning itself refuses FSDP on a CPU before `setup`, so the check runs on the strategy object.
    class Trainer:
        pass

    trainer = Trainer()
    trainer.strategy = strategy()
    with pytest.raises(RuntimeError, match=rf"DataGradientPenalty does not support `{strategy.__name__}`"):
        check_strategy(trainer, "DataGradientPenalty")


class Probe(pl.Callback):
    """What the package's reads of Lightning internals give, checked against what they must mean."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((logger_step(trainer), trainer.global_step, should_log(trainer)))


def test_the_lightning_internals_we_read_still_exist_and_mean_what_we_need():
    """Fails loudly if a Lightning release moves `_logger_connector.should_update_logs` or
    `fit_loop.epoch_loop._batches_that_stepped` (lightning_gp/_lightning_private.py reads them, nowhere else)."""
    probe = Probe()
    fit(Module(make_net()), [probe], steps=6, log_every_n_steps=3)
    # in on_train_batch_end: the logger step is the 0-based step of this batch, one behind global_step
    assert [r[0] for r in probe.rows] == [0, 1, 2, 3, 4, 5]
    assert [r[1] for r in probe.rows] == [1, 2, 3, 4, 5, 6]
    assert [r[2] for r in probe.rows] == [False, False, True, False, False, True]


def test_the_torch_internal_we_read_still_exists():
    """Fails loudly if torch removes `Tensor._version` (lightning_gp/_compat.py reads it, nowhere else)."""
    import torch

    t = torch.zeros(3)
    before = tensor_version(t)
    t.add_(1)
    assert tensor_version(t) == before + 1


def test_compiled_modules_finds_what_torch_and_lightning_compile():
    """Fails loudly if torch's compiled wrapper stops keeping `_orig_mod`, or Lightning's `from_compiled`
    stops setting `_compiler_ctx` (read in lightning_gp/_lightning_private.py and functional/_torch_private.py)."""
    import torch
    from lightning.pytorch.utilities.compile import from_compiled

    from lightning_gp._lightning_private import compiled_modules

    module = Module(torch.compile(make_net(), backend="eager"))
    assert compiled_modules(module) == ["net"]
    root = from_compiled(torch.compile(Module(make_net()), backend="eager"))
    assert compiled_modules(root) == [""]
