"""The CUDA tier: every callback, the WGAN-GP mixin and the monitors on a GPU, in 32-true, bf16-mixed and 16-mixed
(with its GradScaler); dropout replay with CUDA's RNG; SDPA's flash and memory-efficient kernels; no host
synchronisation inside a step where none is needed.

Marked ``cuda`` and skipped without a GPU. One command runs it with the main benchmarks and writes a report:
``bash benchmarks/gpu_check.sh`` (docs/scaling.md). ``LGP_TIER_DEVICE=cpu`` runs the same tests on the CPU (the
sync checks excepted), to check the tier itself where no GPU is at hand.
"""

from __future__ import annotations

import math
import os

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    GradientNormMonitor,
    MLPInequalityMonitor,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    SharpnessMonitor,
    SpectralNormMonitor,
    SpectralNormPenalty,
    VirtualAdversarialTraining,
)

DEVICE = os.environ.get("LGP_TIER_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="the CUDA tier needs a GPU: bash benchmarks/gpu_check.sh"),
]
PRECISIONS = ["32-true", "bf16-mixed", "16-mixed"] if DEVICE == "cuda" else ["32-true", "bf16-mixed"]
STEPS = 4

MEMBERS = {
    "data_double": lambda: [DataGradientPenalty(0.5, method="double_backward")],
    "data_fd": lambda: [DataGradientPenalty(0.5, method="finite_difference")],
    "parameter_double": lambda: [ParameterGradientPenalty(0.1, method="double_backward")],
    "parameter_fd": lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
    "fgm": lambda: [AdversarialTraining(0.1, adversarial_weight=0.5)],
    "pgd": lambda: [AdversarialTraining(0.03, norm="linf", steps=3, random_start=True)],
    "vat": lambda: [VirtualAdversarialTraining(1.0)],
    "spectral": lambda: [SpectralNormPenalty(0.01)],
    "flooding": lambda: [Flooding(0.5)],
    "sam": lambda: [SharpnessAwareMinimization(0.05)],
    "asam": lambda: [SharpnessAwareMinimization(0.5, adaptive=True)],
    "grad_norm_recompute": lambda: [GradientNormMonitor(every_n_steps=1)],
    "grad_norm_fused": lambda: [GradientNormMonitor(every_n_steps=1, mode="fused")],
    "mlp_inequality": lambda: [MLPInequalityMonitor(every_n_steps=1)],
    "spectral_monitor": lambda: [SpectralNormMonitor(every_n_steps=1)],
    "sharpness_monitor": lambda: [SharpnessMonitor(every_n_steps=2, iterations=20)],
}
#: Members whose draws come from a generator on the step's device: CUDA's numbers are not the CPU's.
DEVICE_DRAWS = ("pgd", "vat", "sharpness_monitor")


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        layers = [nn.Linear(16, 64), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else [])
        self.net = nn.Sequential(*layers, nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def loader(n: int = 128, batch: int = 32, shape: tuple = (16,)) -> DataLoader:
    gen = torch.Generator().manual_seed(1)
    return DataLoader(TensorDataset(torch.randn(n, *shape, generator=gen), torch.randint(0, 4, (n,), generator=gen)),
                      batch_size=batch)


def fit(model: pl.LightningModule, callbacks: list, *, device: str = DEVICE, precision: str = "32-true",
        steps: int = STEPS, data: DataLoader | None = None, **kwargs) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(accelerator=device, devices=1, precision=precision, max_steps=steps, callbacks=callbacks,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, **{"log_every_n_steps": 1, **kwargs})
    trainer.fit(model, data if data is not None else loader())
    return trainer


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", list(MEMBERS))
def test_every_callback_and_monitor_trains_on_the_gpu(name, precision):
    model = Net()
    start = params(model)
    trainer = fit(model, MEMBERS[name](), precision=precision)
    end = params(model)
    assert all(torch.isfinite(v).all() for v in end.values()), name
    assert any(not torch.equal(start[k], end[k]) for k in start), f"{name} {precision}: nothing trained"
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert logged and all(math.isfinite(v) for v in logged.values()), logged
    if precision == "32-true" and DEVICE == "cuda" and name not in DEVICE_DRAWS:
        # the same run on the CPU: float32 on both (TF32 is off for matmuls by default), summed in other orders
        cpu_model = Net()
        cpu = fit(cpu_model, MEMBERS[name](), device="cpu")
        for key, value in params(cpu_model).items():
            torch.testing.assert_close(end[key], value, atol=1e-3, rtol=1e-3, msg=f"{name} {key}")
        for key, value in cpu.callback_metrics.items():
            torch.testing.assert_close(logged[key], float(value), atol=1e-3, rtol=1e-3, msg=f"{name} {key}")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_wgan_mixin_trains_on_the_gpu(precision):
    from tests.ddp_scripts.wgan_models import TinyGAN

    model = TinyGAN(n_critic=2)
    start = params(model)
    data = DataLoader(TensorDataset(torch.randn(64, 2, generator=torch.Generator().manual_seed(0))), batch_size=16)
    fit(model, [], precision=precision, steps=6, data=data)
    end = params(model)
    assert all(torch.isfinite(v).all() for v in end.values())
    assert any(not torch.equal(start[k], end[k]) for k in start)


class MaskRecorder:
    """The dropout masks of every forward pass, taken from the layer's input and output."""

    def __init__(self, layer: nn.Dropout) -> None:
        self.masks: list[torch.Tensor] = []
        layer.register_forward_hook(lambda mod, inp, out: self.masks.append(((out == 0) & (inp[0] != 0)).cpu()))


@pytest.mark.parametrize("members", [
    lambda: [DataGradientPenalty(0.5, method="finite_difference", check_reduction=False)],  # no half-batch passes
    lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
    lambda: [SharpnessAwareMinimization(0.05)],
], ids=["data_fd", "parameter_fd", "sam"])
def test_the_second_pass_replays_the_first_pass_dropout_with_the_device_rng(members):
    model = Net(dropout=0.5)
    recorder = MaskRecorder(model.net[2])
    fit(model, members(), steps=1)
    masks = recorder.masks
    assert len(masks) == 2, len(masks)  # the step's pass and the difference's (or SAM's) pass
    assert torch.equal(masks[0], masks[1])
    # the control: two passes without the replay draw different masks
    with torch.no_grad():
        x = torch.randn(32, 16, device=model.device)
        model.train()
        model(x), model(x)
    assert not torch.equal(recorder.masks[-1], recorder.masks[-2])


class Attention(pl.LightningModule):
    """One attention layer through ``F.scaled_dot_product_attention`` with a chosen SDPA kernel."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backend = backend
        self.embed, self.qkv, self.head = nn.Linear(8, 32), nn.Linear(32, 96), nn.Linear(32, 4)

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        b, t, _ = x.shape
        q, k, v = self.qkv(self.embed(x)).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
        with sdpa_kernel(getattr(SDPBackend, self.backend)):
            a = F.scaled_dot_product_attention(q, k, v)
        return self.head(a.transpose(1, 2).reshape(b, t, 32).mean(dim=1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


@pytest.mark.skipif(DEVICE != "cuda", reason="flash and memory-efficient attention are CUDA kernels")
@pytest.mark.parametrize(("backend", "precision"), [("FLASH_ATTENTION", "bf16-mixed"),
                                                    ("EFFICIENT_ATTENTION", "32-true")])
def test_penalty_and_monitors_on_sdpa_flash_and_memory_efficient_attention(backend, precision):
    """These kernels have no double backward: "auto" takes finite differences; the monitors' per-sample norms
    (Linear layers around the attention) equal those of the math kernel."""
    data = loader(64, 16, shape=(12, 8))
    penalty = DataGradientPenalty(0.1)
    monitors = [GradientNormMonitor(every_n_steps=1), GradientNormMonitor(every_n_steps=1, mode="fused")]
    trainer = fit(Attention(backend), [penalty, monitors[0]], precision=precision, data=data)
    assert penalty.resolved_method == "finite_difference"
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())
    fused = fit(Attention(backend), [monitors[1]], precision=precision, data=data)
    math_run = fit(Attention("MATH"), [GradientNormMonitor(every_n_steps=1, mode="fused")], precision=precision,
                   data=data)
    tol = 2e-2 if precision == "bf16-mixed" else 1e-4
    for key, value in math_run.callback_metrics.items():
        torch.testing.assert_close(float(fused.callback_metrics[key]), float(value), rtol=tol, atol=tol, msg=key)


class NoHostSync(pl.Callback):
    """``torch.cuda.set_sync_debug_mode("error")`` from the start of each batch to its backward's end, after a
    warm-up (the first steps decide "auto" methods and check the loss reduction once)."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.guarded = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step >= self.warmup:
            torch.cuda.set_sync_debug_mode("error")

    def on_after_backward(self, trainer, pl_module):
        if torch.cuda.get_sync_debug_mode():
            torch.cuda.set_sync_debug_mode("default")
            self.guarded += 1

    def on_exception(self, trainer, pl_module, exception):
        torch.cuda.set_sync_debug_mode("default")


#: No host read inside a step (with ``check_finite=False``; the finite check is one read a step, on by default).
#: The finite differences and SAM read their step size h (a float for the in-place displacement) and PGD's
#: clamp range check reads once: documented in docs/scaling.md, not checked here.
SYNC_FREE = {
    "flooding": lambda: [Flooding(0.5, check_finite=False)],
    "fgm": lambda: [AdversarialTraining(0.1, adversarial_weight=0.5, check_finite=False)],
    "data_double": lambda: [DataGradientPenalty(0.5, method="double_backward", check_finite=False)],
    "parameter_double": lambda: [ParameterGradientPenalty(0.1, method="double_backward", check_finite=False)],
    "vat": lambda: [VirtualAdversarialTraining(1.0, check_finite=False)],
    "spectral": lambda: [SpectralNormPenalty(0.01, check_finite=False)],
}


@pytest.mark.skipif(DEVICE != "cuda", reason="host synchronisation is a CUDA notion")
@pytest.mark.parametrize("name", list(SYNC_FREE))
def test_no_host_synchronisation_inside_a_step(name):
    guard = NoHostSync()
    fit(Net(), [*SYNC_FREE[name](), guard], steps=5, log_every_n_steps=50)
    assert guard.guarded == 3
