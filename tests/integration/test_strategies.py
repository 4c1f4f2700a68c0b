"""Strategies the package refuses, and the Lightning internals it reads (in one place each)."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_gp import (
    DataGradientPenalty,
    MLPInequalityMonitor,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    SharpnessMonitor,
    SpectralNormMonitor,
    SpectralNormPenalty,
)
from lightning_gp._lightning.logging import logger_step, should_log
from lightning_gp._lightning.setup_checks import check_strategy
from tests.callbacks.test_features import Module, fit
from tests.integration.test_exactness import make_net

#: What FSDP2 refuses in `setup`, and the reason each message must give.
REFUSED_UNDER_FSDP2 = {
    "spectral_penalty": (lambda: SpectralNormPenalty(0.1), "whole weight matrices"),
    "sam_local": (lambda: SharpnessAwareMinimization(0.05), "scope='global'"),
    "parameter_local": (lambda: ParameterGradientPenalty(0.1, method="finite_difference"), "scope='global'"),
    "parameter_double": (lambda: ParameterGradientPenalty(0.1, method="double_backward", scope="global"),
                         "method='finite_difference'"),
    "data_double": (lambda: DataGradientPenalty(0.5, method="double_backward"), "method='finite_difference'"),
    "mlp": (lambda: MLPInequalityMonitor(), "spectral norm"),
    "sigma": (lambda: SpectralNormMonitor(), "whole weight matrices"),
    "sharpness": (lambda: SharpnessMonitor(), "sharded parameters"),
}


@pytest.fixture
def no_process_group_left():
    """ModelParallelStrategy initialises a (1-process) process group in this process before `setup`."""
    yield
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.usefixtures("no_process_group_left")
@pytest.mark.parametrize("name", list(REFUSED_UNDER_FSDP2))
def test_what_fsdp2_cannot_run_is_refused_in_setup(name):
    make, reason = REFUSED_UNDER_FSDP2[name]
    callback = make()
    with pytest.raises(RuntimeError, match=rf"{type(callback).__name__} does not run under `ModelParallelStrategy` "
                                           rf"\(FSDP2\): .*{re.escape(reason)}.*Under FSDP2 the package supports "
                                           r"AdversarialTraining.*strategy='ddp'"):
        fit(Module(make_net()), [callback], steps=1, strategy=ModelParallelStrategy(), accelerator="cpu", devices=1)


@pytest.mark.usefixtures("no_process_group_left")
def test_the_wgan_mixin_is_refused_under_fsdp2():
    from tests.ddp_scripts.wgan_models import TinyGAN

    trainer = pl.Trainer(max_steps=1, accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match=r"WGANGPMixin\) does not run under `ModelParallelStrategy` \(FSDP2\).*"
                                           r"strategy='ddp'"):
        trainer.fit(TinyGAN(), torch.utils.data.DataLoader(torch.randn(8, 2), batch_size=4))


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
    `fit_loop.epoch_loop._batches_that_stepped` (lightning_gp/_lightning/private.py reads them, nowhere else)."""
    probe = Probe()
    fit(Module(make_net()), [probe], steps=6, log_every_n_steps=3)
    # in on_train_batch_end: the logger step is the 0-based step of this batch, one behind global_step
    assert [r[0] for r in probe.rows] == [0, 1, 2, 3, 4, 5]
    assert [r[1] for r in probe.rows] == [1, 2, 3, 4, 5, 6]
    assert [r[2] for r in probe.rows] == [False, False, True, False, False, True]


def test_compiled_modules_finds_what_torch_and_lightning_compile():
    """Fails loudly if torch's compiled wrapper stops keeping `_orig_mod`, or Lightning's `from_compiled`
    stops setting `_compiler_ctx` (read in lightning_gp/_lightning/private.py and functional/_torch_private.py)."""
    import torch
    from lightning.pytorch.utilities.compile import from_compiled

    from lightning_gp._lightning.private import compiled_modules

    module = Module(torch.compile(make_net(), backend="eager"))
    assert compiled_modules(module) == ["net"]
    root = from_compiled(torch.compile(Module(make_net()), backend="eager"))
    assert compiled_modules(root) == [""]
