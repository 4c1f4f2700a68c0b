"""Step time of a Lightning training step with each callback, against a hand-written loop doing the same math.

Setting (the issue's): MLP 64→512→512→10, batch 256, SGD, one fixed batch, weight 0.1.

- *Lightning* side: a ``Trainer(max_steps=...)`` fits an ordinary LightningModule with the callback; a
  timing callback records each step from ``on_train_batch_start`` to ``on_train_batch_end`` (the
  training step, the callback's extra passes, backward, optimizer step, zero_grad and the callback's
  ``self.log``), so Trainer start-up and data loading are excluded.
- *Hand-written* side: the same math in a plain PyTorch loop calling :mod:`lightning_gp.functional`
  directly, timed per step the same way.

All variants run in rounds of chunks (a fresh Trainer per chunk; the first steps of each chunk are warm-up and
dropped), the order shuffled anew each round, so drifts in machine load hit all alike; within a chunk the
hand-written step runs between the Lightning steps (timed apart), so the two sides alternate step by step. Each
ratio is taken within a round, from the chunks' median step times, and reported as the median over rounds
with its interquartile range (min–max under 4 rounds): this machine's speed moves by tens of per cent over a
minute, which a ratio of times measured far apart would count as overhead. Ratios per callback:

- ``L ÷ hand``: Lightning step with the callback ÷ hand-written step (includes Lightning's own per-step
  overhead, which is the same with or without a callback);
- ``L ÷ L plain`` and ``hand ÷ hand plain``: each side against its own plain step;
- ``overhead``: (L ÷ L plain) ÷ (hand ÷ hand plain), what the callback adds beyond the math, with
  Lightning's fixed per-step cost cancelled: the honest measure of the adapter, target ≤ 1.05.

A diagnostic Lightning row, "plain + one self.log per step", shows what one ``self.log`` call costs (each
callback logs one or two values per step); it is Lightning's cost, not the penalty's.

Run::

    python -m benchmarks.bench_callbacks            # CPU, and CUDA when present
    python -m benchmarks.bench_callbacks --quick    # fewer rounds (noisier)
    python -m benchmarks.bench_callbacks --only "SAM (ρ = 0.05)" --rounds 20   # one row, more rounds
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import time
import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.harness import Row, devices, format_table, ratio_stats, sync
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
from lightning_gp.functional import (
    data_gradient_penalty,
    data_gradient_penalty_fd,
    fgsm,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
    pgd,
    spectral_norm_penalty,
)
from tests import robust_loops  # the authors' steps the tests compare the baselines with

WEIGHT = 0.1
EPSILON = 0.1
RHO = 0.05
EPS_LINF, BETA, GAMMA = 8 / 255, 6.0, 5e-3
TARGET = 1.05
BATCH = 256
#: The clock the steps are timed with: wall time (default), or with ``--clock cpu`` the process's CPU time, which a
#: shared machine's other tenants do not inflate (with one thread it is the step's compute; on CUDA wall time only).
CLOCK: list[Callable[[], float]] = [time.perf_counter]


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


#: name → factory of the callback, or of a list of callbacks (None: plain Lightning step).
CALLBACKS: dict[str, Callable[[], Callback | list[Callback]] | None] = {
    "plain": None,
    "data penalty, double backward": lambda: DataGradientPenalty(WEIGHT),
    "data penalty, finite difference": lambda: DataGradientPenalty(WEIGHT, method="finite_difference"),
    "parameter penalty, double backward": lambda: ParameterGradientPenalty(WEIGHT),
    "parameter penalty, finite difference": lambda: ParameterGradientPenalty(WEIGHT, method="finite_difference"),
    "spectral norm penalty": lambda: SpectralNormPenalty(WEIGHT),
    "FGSM adversarial (l2)": lambda: AdversarialTraining(EPSILON),
    "SAM (ρ = 0.05)": lambda: SharpnessAwareMinimization(RHO),
    # the same without the step's finiteness check, which the hand-written reference does not make
    "SAM, check_finite=False": lambda: SharpnessAwareMinimization(RHO, check_finite=False),
    # the robust-training baselines, against their authors' steps (l∞, ε = 8/255, 10 inner steps of ε/4)
    "PGD-10 (l∞)": lambda: AdversarialTraining(EPS_LINF, norm="linf", steps=10, step_size=EPS_LINF / 4,
                                               clamp=(0.0, 1.0)),
    "PGD-10 + AWP": lambda: [AdversarialTraining(EPS_LINF, norm="linf", steps=10, step_size=EPS_LINF / 4,
                                                 clamp=(0.0, 1.0)), AdversarialWeightPerturbation(GAMMA)],
    "TRADES": lambda: TRADES(EPS_LINF, BETA),
    "TRADES + AWP": lambda: [TRADES(EPS_LINF, BETA), AdversarialWeightPerturbation(GAMMA)],
    "MART": lambda: MART(EPS_LINF, BETA),
    "FGSM + GradAlign": lambda: [AdversarialTraining(EPS_LINF, norm="linf", clamp=(0.0, 1.0)),
                                 GradAlign(0.2, EPS_LINF, method="double_backward")],
}


def hand_written_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    """One training step per variant, the way one would write it without Lightning."""
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-3)
    spectral_state: dict[str, torch.Tensor] = {}

    def per_sample(inp):
        return F.cross_entropy(model(inp), y, reduction="none")

    def loss_fn():
        return F.cross_entropy(model(x), y)

    def update():
        opt.step()
        opt.zero_grad(set_to_none=True)

    def set_grads(base, extra):
        for p, g0, g1 in zip(params, base, extra, strict=True):
            p.grad = torch.add(g0, g1, alpha=WEIGHT)

    def plain():
        loss_fn().backward()
        update()

    def data_db():
        xr = x.detach().requires_grad_(True)
        losses = per_sample(xr)
        (losses.mean() + WEIGHT * data_gradient_penalty(losses, xr)).backward()
        update()

    def data_fd():
        res = data_gradient_penalty_fd(per_sample, x, params)
        set_grads(res.output_grads, res.grads)
        update()

    def param_db():
        loss = loss_fn()
        (loss + WEIGHT * parameter_gradient_penalty(loss, params)).backward()
        update()

    def param_fd():
        res = parameter_gradient_penalty_fd(loss_fn, params)
        set_grads(res.output_grads, res.grads)
        update()

    def spectral():
        # Warm-started power iteration (one step per training step), as the callback does.
        (loss_fn() + WEIGHT * spectral_norm_penalty(model, n_iter=1 if spectral_state else None,
                                                    vectors=spectral_state)).backward()
        update()

    def adversarial():
        x_adv = fgsm(per_sample, x, epsilon=EPSILON, norm="l2")
        F.cross_entropy(model(x_adv), y).backward()
        update()

    def sam():
        # davda54/sam's SAM.step, the reference implementation: first_step saves θ (old_p = p.data.clone()) and adds
        # e_w = ρ·g/(‖g‖ + 1e-12); the second backward's gradient is taken there; second_step restores θ exactly
        # (p.data = old_p) and steps the base optimizer.
        loss_fn().backward()
        with torch.no_grad():
            grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
            scale = RHO / (grad_norm + 1e-12)
            old = [p.data.clone() for p in params]
            for p in params:
                p.add_(p.grad * scale)
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        with torch.no_grad():
            for p, o in zip(params, old, strict=True):
                p.data = o
        update()

    def pgd10():
        x_adv = pgd_x_adv()
        F.cross_entropy(model(x_adv), y).backward()
        update()

    def pgd_x_adv():
        return pgd(lambda u: F.cross_entropy(model(u), y), x, epsilon=EPS_LINF, norm="linf", steps=10,
                   step_size=EPS_LINF / 4, random_start=False, clamp=(0.0, 1.0))

    awp = AuthorsAWP(model)
    gen = torch.Generator(x.device).manual_seed(0)

    def pgd10_awp():
        x_adv = pgd_x_adv()
        diff = awp.calc(lambda m: F.cross_entropy(m(x_adv), y))
        awp.add(diff, GAMMA)
        F.cross_entropy(model(x_adv), y).backward()
        update()
        awp.add(diff, -GAMMA)

    def trades():
        robust_loops.trades_step_loss(model, x, y, EPS_LINF, BETA, EPS_LINF / 4, 10, gen).backward()
        update()

    def trades_awp():
        model.eval()
        x_adv = robust_loops.trades_x_adv(model, x, EPS_LINF, EPS_LINF / 4, 10, gen)
        model.train()

        def objective(m):
            return F.cross_entropy(m(x), y) + BETA * F.kl_div(F.log_softmax(m(x_adv), 1), F.softmax(m(x), 1),
                                                                reduction="batchmean")
        diff = awp.calc(objective)
        awp.add(diff, GAMMA)
        objective(model).backward()
        update()
        awp.add(diff, -GAMMA)

    def mart():
        robust_loops.mart_step_loss(model, x, y, EPS_LINF, BETA, EPS_LINF / 4, 10, gen).backward()
        update()

    def fgsm_grad_align():
        robust_loops.grad_align_fgsm_step_loss(model, x, y, EPS_LINF, 0.2, gen).backward()
        update()

    return dict(zip(CALLBACKS, (plain, data_db, data_fd, param_db, param_fd, spectral, adversarial, sam, sam, pgd10,
                                pgd10_awp, trades, trades_awp, mart, fgsm_grad_align), strict=True))


class AuthorsAWP:
    """csdongxian/AWP's ``AdvWeightPerturb``: a persistent proxy copy loaded with the model's state each step, one SGD
    step (lr 0.01) of −objective on it, per weight of dimension > 1 the ‖W‖-scaled difference."""

    def __init__(self, model: nn.Module) -> None:
        import copy

        self.model, self.proxy = model, copy.deepcopy(model)
        self.proxy_opt = torch.optim.SGD(self.proxy.parameters(), lr=0.01)

    def calc(self, objective: Callable[[nn.Module], torch.Tensor]) -> dict[str, torch.Tensor]:
        self.proxy.load_state_dict(self.model.state_dict())
        self.proxy.train()
        loss = -objective(self.proxy)
        self.proxy_opt.zero_grad()
        loss.backward()
        self.proxy_opt.step()
        diff = {}
        for (name, old), (_, new) in zip(self.model.state_dict().items(), self.proxy.state_dict().items(),
                                         strict=True):
            if old.ndim > 1 and "weight" in name:
                diff[name] = old.norm() / ((new - old).norm() + 1e-20) * (new - old)
        return diff

    def add(self, diff: dict[str, torch.Tensor], coeff: float) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in diff:
                    param.add_(coeff * diff[name])


class BenchModule(L.LightningModule):
    """An ordinary classifier; the callbacks change its loss from outside."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x):  # the logits TRADES and MART ask for (MART reads those of the step's own call)
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class LoggingBenchModule(BenchModule):
    """The plain step plus one ``self.log`` per step, as each callback does: shows what a log call costs."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss.detach(), on_step=True, on_epoch=False, sync_dist=True, batch_size=BATCH)
        return loss


#: Lightning-only rows that explain the overhead (no hand-written counterpart).
DIAGNOSTICS = {"plain + one self.log per step": LoggingBenchModule}


class StepTimer(Callback):
    """Wall time of each training step, ``on_train_batch_start`` → ``on_train_batch_end`` (synchronized)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._start = CLOCK[0]()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.times.append(CLOCK[0]() - self._start)


class RepeatedBatch:
    """An iterable serving one batch ``n`` times (a list would be read by Lightning as several loaders)."""

    def __init__(self, batch: tuple, n: int) -> None:
        self.batch, self.n = batch, n

    def __iter__(self):
        return (self.batch for _ in range(self.n))

    def __len__(self) -> int:
        return self.n


class HandBetweenSteps(Callback):
    """Runs and times the hand-written step after each Lightning step (after :class:`StepTimer` has stopped), so the
    two sides alternate step by step and a change of the machine's speed reaches both within milliseconds."""

    def __init__(self, step: Callable[[], None], device: torch.device) -> None:
        self.step, self.device = step, device
        self.times: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times += hand_chunk(self.step, self.device, 1)


def lightning_chunk(name: str, device: torch.device, batch: tuple, steps: int,
                    hand_step: Callable[[], None] | None = None) -> tuple[list[float], list[float]]:
    """Per-step times of one short fit with the callback (or diagnostic) ``name`` (fresh Trainer and model), and of
    ``hand_step`` run between its steps (empty without one)."""
    torch.manual_seed(0)
    timer = StepTimer(device)
    hand = HandBetweenSteps(hand_step, device) if hand_step is not None else None
    factory = CALLBACKS.get(name)
    made = factory() if factory is not None else []
    callbacks = [timer] + ([hand] if hand is not None else []) + (made if isinstance(made, list) else [made])
    module = DIAGNOSTICS.get(name, BenchModule)()
    trainer = L.Trainer(
        accelerator=device.type, devices=1, max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    # One batch, already on the device, served `steps` times: no data loading in the timed region.
    trainer.fit(module, train_dataloaders=RepeatedBatch(batch, steps))
    return timer.times, (hand.times if hand is not None else [])


def hand_chunk(fn: Callable[[], None], device: torch.device, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        sync(device)
        start = CLOCK[0]()
        fn()
        sync(device)
        times.append(CLOCK[0]() - start)
    return times


def measure(device: torch.device, rounds: int, steps: int, warmup: int,
            names: list[str] | None = None) -> tuple[dict, dict]:
    """Per-round median step seconds, ``(lightning, hand)``, each ``{name: [round 0, round 1, ...]}``.

    Every round runs each variant's Lightning chunk with its hand-written step between the Lightning steps, the
    variants in an order shuffled anew per round, so a drift of the machine's speed hits all alike; ratios are then
    taken within a round (`ratio_stats`), never between times measured minutes apart.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 64, generator=gen).to(device)  # in [0, 1]: the box of the l∞ baselines
    y = torch.randint(0, 10, (BATCH,), generator=gen).to(device)
    torch.manual_seed(0)
    model = mlp().to(device)
    hand = hand_written_steps(model, x, y)
    chosen = ["plain", *(n for n in (names or [*CALLBACKS, *DIAGNOSTICS]) if n != "plain")]
    lit: dict[str, list[float]] = {n: [] for n in chosen}
    hand_times: dict[str, list[float]] = {n: [] for n in chosen if n in hand}
    order_rng = random.Random(0)
    for _ in range(rounds):
        order = list(chosen)
        order_rng.shuffle(order)
        for name in order:
            lit_chunk, hand_chunk_ = lightning_chunk(name, device, (x, y), warmup + steps, hand.get(name))
            lit[name].append(statistics.median(lit_chunk[warmup:]))
            if name in hand:
                hand_times[name].append(statistics.median(hand_chunk_[warmup:]))
    return lit, hand_times


def _cell(ratios: list[float]) -> tuple[float, str]:
    med, low, high = ratio_stats(ratios)
    return med, f"{med:.2f} ({low:.2f}–{high:.2f})"


def comparison_table(title: str, lit: dict, hand: dict) -> str:
    """Per callback: ms (median over rounds) and the per-round ratios' median (interquartile range)."""
    lines = [
        f"### {title}", "",
        "| callback | hand ms | Lightning ms | L ÷ hand | hand ÷ hand plain | L ÷ L plain | overhead | target | met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for name in hand:
        per_round = lambda a, b: [x / y for x, y in zip(a, b, strict=True)]  # noqa: E731
        h_rel, l_rel = per_round(hand[name], hand["plain"]), per_round(lit[name], lit["plain"])
        overhead, overhead_cell = _cell(per_round(l_rel, h_rel))
        target, met = ("", "") if name == "plain" else (f"≤ {TARGET:.2f}×", "yes" if overhead <= TARGET else "**no**")
        lines.append(
            f"| {name} | {statistics.median(hand[name]) * 1e3:.2f} | {statistics.median(lit[name]) * 1e3:.2f} "
            f"| {_cell(per_round(lit[name], hand[name]))[1]} | {_cell(h_rel)[1]} | {_cell(l_rel)[1]} "
            f"| {overhead_cell} | {target} | {met} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    parser.add_argument("--steps", type=int, default=None, help="override the kept steps per chunk")
    parser.add_argument("--only", nargs="+", choices=[*CALLBACKS, *DIAGNOSTICS], default=None, metavar="NAME",
                        help="measure these rows only (and the plain step they are divided by)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall time, or the process's CPU time (steadier on a shared machine; CPU runs only)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps, warmup = (2, 8, 3) if args.quick else (8, 25, 5)
    rounds, steps = args.rounds or rounds, args.steps or steps
    warnings.filterwarnings("ignore", module="lightning")  # "no val loop", "few workers", ...
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)  # "GPU available: ..." per Trainer
    tables = []
    for device in devices():
        CLOCK[0] = time.process_time if args.clock == "cpu" and device.type == "cpu" else time.perf_counter
        lit, hand = measure(device, rounds, steps, warmup, args.only)
        title = (f"{device.type.upper()} ({torch.get_num_threads()} threads): MLP 64→512→512→10, batch 256, "
                 f"{rounds} rounds × {steps} kept steps, {args.clock} clock; ms: median over rounds; ratios: median "
                 f"of the per-round "
                 f"ratios (interquartile range)")
        detail = format_table(f"{device.type.upper()}: Lightning steps ÷ plain Lightning step",
                              [Row(n, statistics.median(t), statistics.median(lit["plain"]))
                               for n, t in lit.items()])
        tables.append(comparison_table(title, lit, hand) + "\n\n" + detail)
    out = "\n\n".join(tables)
    print(out)
    return out


if __name__ == "__main__":
    main()
