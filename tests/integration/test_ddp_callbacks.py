"""Real 2-process CPU DDP (one launch) against one process on the combined batch."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import CostMonitor, SharpnessMonitor
from lightning_gp.callbacks import (
    MART,
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    DataGradientPenalty,
    GradAlign,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    SpectralNormPenalty,
)

PER_RANK_BATCH = 4
STEPS = 3
LR = 0.1

CONFIGS = {
    "data_double_backward": lambda: [DataGradientPenalty(0.5)],
    "data_finite_difference": lambda: [DataGradientPenalty(0.5, power=1, method="finite_difference")],
    "adversarial_fgsm": lambda: [AdversarialTraining(0.3, adversarial_weight=0.5)],
    "adversarial_pgd_linf": lambda: [AdversarialTraining(0.1, norm="linf", steps=2)],
    "parameter_local": lambda: [ParameterGradientPenalty(0.2)],
    "parameter_global": lambda: [ParameterGradientPenalty(0.2, scope="global")],
    "parameter_global_fd": lambda: [ParameterGradientPenalty(0.2, scope="global", method="finite_difference")],
    "combined": lambda: [SpectralNormPenalty(0.05), DataGradientPenalty(0.5), ParameterGradientPenalty(0.1,
                                                                                                      scope="global")],
    "sam_local": lambda: [SharpnessAwareMinimization(0.05)],
    "sam_global": lambda: [SharpnessAwareMinimization(0.05, scope="global")],
    "asam_global": lambda: [SharpnessAwareMinimization(0.5, adaptive=True, scope="global")],
    # the Hessian of the global loss: the ranks' products averaged
    "sharpness_monitor": lambda: [SharpnessMonitor(every_n_steps=1, iterations=300, tol=1e-12,
                                                   method="double_backward")],
    # its collective (the time shares averaged over the ranks) runs on every rank; the passes are one process's
    "cost_monitor": lambda: [DataGradientPenalty(0.5, method="double_backward"), CostMonitor(every_n_steps=1)],
    # d averaged over the ranks: the whole batch's, as one process (and the authors' DataParallel)
    "pgd_awp": lambda: [AdversarialTraining(0.1, norm="linf", steps=2), AdversarialWeightPerturbation(0.05)],
    "trades": lambda: [TRADES(0.3, 2.0, steps=3, bounds=None, logits_fn=lambda module, batch: module.net(batch[0]))],
    "fgsm_grad_align": lambda: [AdversarialTraining(0.3, norm="linf"), GradAlign(0.5, 0.3)],
    "mart": lambda: [MART(0.3, 2.0, steps=3, bounds=None, logits_fn=lambda module, batch: module.net(batch[0]))],
}
#: Configurations whose DDP result is, by design, not the one-process one (each rank uses its own gradient).
LOCAL = ("parameter_local", "sam_local")
#: Configurations with a random draw by each rank's generator (the one-process run draws another): equal to one
#: process up to what that draw changes (TRADES's start 0.001·N(0, I), GradAlign's η ~ U[−ε, ε]).
DRAWN = {"trades": "adversarial/trades_kl", "fgsm_grad_align": "penalty/grad_align", "mart": "adversarial/mart_kl"}


def data() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    n = 2 * PER_RANK_BATCH * STEPS
    return TensorDataset(torch.randn(n, 5, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (n,), generator=gen))


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


class _RankSampler(torch.utils.data.Sampler):
    """Samples rank, rank + W, rank + 2W, ... (rank read when iterating, after DDP has started)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        return self.n // self._world()[1]


def fit(name: str, *, batch_size: int, **trainer_kwargs) -> tuple[pl.Trainer, Net]:
    model = Net()
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", precision="64-true", callbacks=CONFIGS[name](),
                         use_distributed_sampler=False, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1,  # the callbacks log on the logger's steps: here every step
                         **trainer_kwargs)
    # Lightning's DistributedSampler always shuffles training data; ours does not: rank r gets samples
    # r, r+2, ... so the union of the ranks' t-th batches is the one-process t-th batch of size 2·b (the
    # order inside a batch does not change a mean).
    ds = data()
    trainer.fit(model, DataLoader(ds, batch_size=batch_size, sampler=_RankSampler(len(ds))))
    return trainer, model


def _two_rank_reference(rank_gradient) -> dict[str, torch.Tensor]:
    """Hand-written DDP: each rank's gradient from ``rank_gradient(model, params, x, y)`` on its own half of the
    step's batch, the two averaged (DDP's all-reduce), then SGD."""
    model = Net().double()
    params = list(model.parameters())
    ds = data()
    for t in range(STEPS):
        block = range(2 * PER_RANK_BATCH * t, 2 * PER_RANK_BATCH * (t + 1))
        total = [torch.zeros_like(p) for p in params]
        for rank in range(2):
            idx = torch.tensor([i for i in block if i % 2 == rank])
            for acc, gi in zip(total, rank_gradient(model, params, ds.tensors[0][idx], ds.tensors[1][idx]),
                               strict=True):
                acc += gi / 2
        with torch.no_grad():
            for p, gi in zip(params, total, strict=True):
                p -= LR * gi
    return model.state_dict()


def _local_scope_reference() -> dict[str, torch.Tensor]:
    """Each rank penalises its own gradient."""

    def penalised(model, params, x, y):
        loss = F.cross_entropy(model.net(x), y)
        g = torch.autograd.grad(loss, params, create_graph=True)
        return torch.autograd.grad(loss + 0.2 * sum(gi.square().sum() for gi in g), params)

    return _two_rank_reference(penalised)


def _local_sam_reference(rho: float = 0.05) -> dict[str, torch.Tensor]:
    """SAM with each rank's ε from its own gradient (tests/callbacks/test_sam.py's hand-written step)."""
    from tests.callbacks.test_sam import hand_sam_gradient

    return _two_rank_reference(lambda model, params, x, y: hand_sam_gradient(
        lambda: F.cross_entropy(model.net(x), y), params, rho))


#: The prefixes of what the callbacks and monitors log.
PACKAGE_KEYS = ("penalty/", "adversarial/", "sharpness/", "flooding/", "vat/", "lipschitz/", "grad_norm/",
                "noise_scale/", "spectral/")


@pytest.mark.ddp
def test_ddp_matches_one_process(tmp_path):
    from tests.ddp import run_ddp_script

    ddp = run_ddp_script("callbacks_ddp.py", tmp_path / "out.pt")
    # RunSeed: rank 0's seed on both ranks, though the ranks' processes were seeded 100 and 101
    assert ddp.pop("run_seed").tolist() == [[100, 100], [100, 101]]
    assert set(ddp) == set(CONFIGS)
    for name in DRAWN:
        trainer, model = fit(name, batch_size=2 * PER_RANK_BATCH, devices=1)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ddp[name]["params"][key], value, atol=2e-2, rtol=0, msg=f"{name} {key}")
        assert not torch.equal(ddp[name]["params"]["net.0.weight"], Net().net[0].weight)
        assert float(ddp[name]["metrics"][DRAWN[name]]) > 0
    for name in CONFIGS:
        if name in LOCAL or name in DRAWN:
            continue
        trainer, model = fit(name, batch_size=2 * PER_RANK_BATCH, devices=1)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ddp[name]["params"][key], value, atol=1e-5, rtol=0, msg=f"{name} {key}")
        # Every value the package logs is the sample-weighted mean over the ranks of per-rank means: the one-process
        # value on the combined batch.
        logged = [k for k in trainer.callback_metrics if k.startswith(PACKAGE_KEYS)]
        assert logged and set(logged) <= set(ddp[name]["metrics"]), name
        for key, value in trainer.callback_metrics.items():
            if key.startswith(PACKAGE_KEYS):
                torch.testing.assert_close(ddp[name]["metrics"][key].double(), value.double(), atol=1e-6,
                                           rtol=1e-6, msg=f"{name} {key}")

        passes = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("cost/") and "passes" in k}
        assert passes == {k: float(v) for k, v in ddp[name]["metrics"].items() if k.startswith("cost/")
                          and "passes" in k}, name
        assert all(0 <= float(v) <= 1 for k, v in ddp[name]["metrics"].items() if k.endswith("time_fraction"))
    assert ddp["cost_monitor"]["metrics"]["cost/DataGradientPenalty/backward_passes"] == 1

    # scope="local": each rank penalises its own gradient (documented); a hand-written two-rank
    # computation reproduces it, and it differs from the one-process result that scope="global" matches.
    local = _local_scope_reference()
    for key, value in local.items():
        torch.testing.assert_close(ddp["parameter_local"]["params"][key], value, atol=1e-5, rtol=0)
    diff = max((ddp["parameter_local"]["params"][k] - ddp["parameter_global"]["params"][k]).abs().max()
               for k in local)
    assert diff > 1e-4
    # SAM's scope="local" (its reference implementation's m-sharpness): the same, with SAM's hand-written loop.
    local = _local_sam_reference()
    for key, value in local.items():
        torch.testing.assert_close(ddp["sam_local"]["params"][key], value, atol=1e-9, rtol=0)
    diff = max((ddp["sam_local"]["params"][k] - ddp["sam_global"]["params"][k]).abs().max() for k in local)
    assert diff > 1e-6
    assert "sharpness/lambda_max" in ddp["sharpness_monitor"]["metrics"]
