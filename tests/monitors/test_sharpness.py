"""SharpnessMonitor and the functional sharpness: λ_max against the exact Hessian's eigvalsh, the trace
statistically against the exact one, and a training run that the monitor leaves bit-identical."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import SharpnessMonitor
from lightning_gp.functional import hessian_max_eigenvalue, hessian_trace

QUIET = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def data(n: int = 32) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                                               generator=gen))


class Net(pl.LightningModule):
    def __init__(self, dropout: float = 0.0, batch_norm: bool = False, lr: float = 0.1) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        layers = [torch.nn.Linear(4, 6)] + ([torch.nn.BatchNorm1d(6)] if batch_norm else [])
        layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(6, 3)]
        self.net = torch.nn.Sequential(*layers)
        self.lr = lr
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def exact_hessian(module: torch.nn.Module, batch) -> torch.Tensor:
    """The full Hessian of the training loss w.r.t. all parameters, flattened (torch.autograd.functional)."""
    names = [n for n, _ in module.named_parameters()]
    shapes = [p.shape for _, p in module.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in module.parameters()])

    def objective(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        params = {n: c.view(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        x, y = batch
        out = torch.func.functional_call(module.net, {k[len("net."):]: v for k, v in params.items()}, (x,))
        return F.cross_entropy(out, y)

    return torch.autograd.functional.hessian(objective, flat)


def top_eigenvalue(hessian: torch.Tensor) -> float:
    values = torch.linalg.eigvalsh(hessian)
    return float(values[values.abs().argmax()])


def test_lambda_max_equals_eigvalsh_of_the_exact_hessian():
    module = Net().double()
    batch = data()[:]
    hessian = exact_hessian(module, batch)
    values = torch.linalg.eigvalsh(hessian)
    assert values[-1] > 0 and abs(values[0]) < values[-1]  # the dominant eigenvalue is λ_max
    monitor = SharpnessMonitor(iterations=2000, tol=1e-12, method="double_backward")
    got = float(monitor.measure(module, batch)["sharpness/lambda_max"])
    assert abs(got - float(values[-1])) <= 1e-4 * float(values[-1])


def test_finite_differences_agree_with_the_double_backward():
    module = Net().double()
    batch = data()[:]
    exact = top_eigenvalue(exact_hessian(module, batch))
    monitor = SharpnessMonitor(iterations=2000, tol=1e-12, method="finite_difference", step=1e-5)
    got = float(monitor.measure(module, batch)["sharpness/lambda_max"])
    assert abs(got - exact) <= 1e-4 * abs(exact)


def test_functional_max_eigenvalue_and_trace():
    module = Net().double()
    x, y = data()[:]
    hessian = exact_hessian(module, (x, y))
    loss = F.cross_entropy(module.net(x), y)
    got = hessian_max_eigenvalue(loss, module, iterations=2000, tol=1e-12)
    assert abs(float(got) - top_eigenvalue(hessian)) <= 1e-4 * abs(top_eigenvalue(hessian))
    # Hutchinson with Rademacher vectors: unbiased, variance 2·(‖H‖_F² − Σ Hᵢᵢ²) per sample
    samples = 400
    estimate = hessian_trace(F.cross_entropy(module.net(x), y), module, samples=samples,
                             generator=torch.Generator().manual_seed(0))
    exact = float(torch.trace(hessian))
    sd = math.sqrt(2 * (float(hessian.square().sum()) - float(torch.diagonal(hessian).square().sum())) / samples)
    assert abs(float(estimate) - exact) <= 4 * sd
    assert sd < 0.5 * abs(exact)  # the check above has teeth


def test_in_a_trainer_it_logs_and_leaves_training_bit_identical(tmp_path):
    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        module = Net(dropout=0.3, batch_norm=True)
        trainer = pl.Trainer(max_steps=6, precision="64-true", callbacks=callbacks, log_every_n_steps=1,
                             logger=CSVLogger(tmp_path, name=str(len(callbacks))), **QUIET)
        trainer.fit(module, DataLoader(data(), batch_size=8))
        return module, trainer

    plain, _ = run([])
    watched, _ = run([SharpnessMonitor(every_n_steps=2, trace=True, iterations=5, trace_samples=2)])
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # parameters, BatchNorm statistics
    with open(next(tmp_path.glob("1/version_0/metrics.csv"))) as f:
        rows = [r for r in csv.DictReader(f) if r.get("sharpness/lambda_max")]
    assert [int(r["step"]) for r in rows] == [1, 3, 5]
    assert all(float(r["sharpness/two_over_lr"]) == pytest.approx(20.0) for r in rows)
    assert all(math.isfinite(float(r["sharpness/trace"])) for r in rows)


def test_auto_takes_finite_differences_on_a_compiled_model():
    module = Net().double()
    module.net = torch.compile(module.net, backend="aot_eager")
    monitor = SharpnessMonitor(iterations=30, tol=1e-9)
    got = float(monitor.measure(module, data()[:])["sharpness/lambda_max"])
    assert "-> 'finite_difference'" in repr(monitor)
    reference = Net().double()
    exact = top_eigenvalue(exact_hessian(reference, data()[:]))
    assert abs(got - exact) <= 1e-2 * abs(exact)


@pytest.mark.parametrize("kwargs,error", [
    (dict(every_n_steps=0), "`every_n_steps` must be an integer >= 1"),
    (dict(iterations=0), "`iterations` must be an integer >= 1"),
    (dict(tol=-1.0), "`tol` must be a non-negative number"),
    (dict(method="lanczos"), "`method` must be one of"),
    (dict(step=0.0), "`step` must be a positive number"),
])
def test_bad_arguments_are_named(kwargs, error):
    with pytest.raises(ValueError, match=error):
        SharpnessMonitor(**kwargs)


def test_beside_sam_it_measures_the_module_s_own_loss_and_leaves_the_run_alone(tmp_path):
    """The monitor differentiates the loss `training_step` returns, not SAM's objective, and the SAM run with the
    monitor equals the one without it."""
    from lightning_gp import SharpnessAwareMinimization

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        module = Net(dropout=0.3)
        trainer = pl.Trainer(max_steps=4, precision="64-true", callbacks=callbacks, log_every_n_steps=1,
                             logger=False, **QUIET)
        trainer.fit(module, DataLoader(data(), batch_size=8))
        return module

    monitor = SharpnessMonitor(every_n_steps=4, iterations=2000, tol=1e-12)
    plain = run([SharpnessAwareMinimization(0.05)])
    watched = run([SharpnessAwareMinimization(0.05), monitor])
    for a, b in zip(plain.state_dict().values(), watched.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert math.isfinite(monitor.last_logged["sharpness/lambda_max"]) and monitor.last_logged_step == 3


def test_double_backward_asked_of_a_compiled_model_is_a_clear_error():
    module = Net().double()
    module.net = torch.compile(module.net, backend="aot_eager")
    with pytest.raises(RuntimeError, match="method='finite_difference'"):
        SharpnessMonitor(method="double_backward", iterations=3).measure(module, data()[:])


def test_a_skipped_batch_is_not_measured():
    class Skips(Net):
        def training_step(self, batch, batch_idx):
            return None if batch_idx == 1 else super().training_step(batch, batch_idx)

    monitor = SharpnessMonitor(every_n_steps=1, iterations=3)
    trainer = pl.Trainer(max_epochs=1, precision="64-true", callbacks=[monitor], logger=False, **QUIET)
    trainer.fit(Skips(), DataLoader(data(16), batch_size=8))
    assert monitor.last_logged_step == 0  # measured on batch 0; batch 1 returned None and is skipped, no error


def test_complex_parameters_count_as_their_real_and_imaginary_parts():
    """λ_max and the trace over a complex parameter z = a + ib are those of the real Hessian over (a, b): the
    Rayleigh quotient and the Rademacher probes take both parts (they took the real part alone, a wrong number)."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(3, dtype=torch.float64, generator=gen) for _ in range(2))
    x = torch.randn(9, 3, dtype=torch.complex128, generator=gen)

    def loss_of(z):
        return ((x * z).sum(-1).abs() ** 2 + 1).log().mean() + 2.0 * (z.imag ** 2).sum()  # λ_max along b

    hessian = torch.autograd.functional.hessian(lambda ab: loss_of(torch.complex(ab[:3], ab[3:])), torch.cat([a, b]))
    z = torch.complex(a, b).requires_grad_(True)
    got = hessian_max_eigenvalue(loss_of(z), [z], iterations=5000, tol=1e-13)
    assert abs(float(got) - top_eigenvalue(hessian)) <= 1e-6 * abs(top_eigenvalue(hessian))
    samples = 2000
    estimate = hessian_trace(loss_of(z), [z], samples=samples, generator=torch.Generator().manual_seed(0))
    exact = float(torch.trace(hessian))
    sd = math.sqrt(2 * (float(hessian.square().sum()) - float(torch.diagonal(hessian).square().sum())) / samples)
    assert abs(float(estimate) - exact) <= 4 * sd and sd < 0.1 * abs(exact)
    real_part_only = float(torch.trace(hessian[:3, :3]))
    assert torch.linalg.eigh(hessian).eigenvectors[3:, -1].norm() > 0.9  # the top direction is imaginary
    assert abs(real_part_only - exact) > 8 * sd  # the control: the real block alone is told apart
