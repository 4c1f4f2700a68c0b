"""Collectives per training step of each callback under 2-process DDP and FSDP2, counted with torch.profiler.

``python -m benchmarks.bench_communication`` (2 CPU processes, gloo; about a minute). The model is the FSDP2
tests' feature MLP widened to 64→256→256→10 (about 85k parameters, 0.34 MB in float32), each Linear its own FSDP2
unit; 4 profiled steps after 2 warm-up steps. A collective's size is the tensor it sends from one rank. The table
is what ``docs/scaling.md`` reports; counts and sizes depend on the model only through its units and parameters.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import GradientNormMonitor
from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    VirtualAdversarialTraining,
)

WARMUP, STEPS, BATCH = 2, 4, 32
#: name → (callbacks, whether FSDP2 runs it)
CONFIGS: dict[str, tuple[Callable[[], list], bool]] = {
    "plain step": (lambda: [], True),
    "FGM (AdversarialTraining)": (lambda: [AdversarialTraining(0.1)], True),
    "PGD, 3 steps": (lambda: [AdversarialTraining(0.1, norm="linf", steps=3)], True),
    "VAT": (lambda: [VirtualAdversarialTraining(0.5)], True),
    "data penalty, finite difference": (lambda: [DataGradientPenalty(0.1, method="finite_difference")], True),
    "data penalty, double backward": (lambda: [DataGradientPenalty(0.1, method="double_backward")], False),
    "parameter penalty FD, scope=local": (lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
                                          False),
    "parameter penalty FD, scope=global": (lambda: [ParameterGradientPenalty(0.1, method="finite_difference",
                                                                             scope="global")], True),
    "parameter penalty double backward, global": (lambda: [ParameterGradientPenalty(
        0.1, method="double_backward", scope="global")], False),
    "SAM, scope=local": (lambda: [SharpnessAwareMinimization(0.05)], False),
    "SAM, scope=global": (lambda: [SharpnessAwareMinimization(0.05, scope="global")], True),
    "GradientNormMonitor (recompute)": (lambda: [GradientNormMonitor(every_n_steps=1, histograms=False)], True),
    "GradientNormMonitor (fused)": (lambda: [GradientNormMonitor(every_n_steps=1, mode="fused",
                                                                 histograms=False)], True),
}


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(64, 256), torch.nn.Linear(256, 256),
                                           torch.nn.Linear(256, 10)])

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        for layer in self.layers:
            fully_shard(layer, mesh=self.device_mesh["data_parallel"])
        fully_shard(self, mesh=self.device_mesh["data_parallel"])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.tanh(layer(x))
        return self.layers[-1](x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Collectives(pl.Callback):
    """Counts the collectives of the profiled steps (c10d ops; sizes from gloo's record of the sent tensor)."""

    def __init__(self) -> None:
        self.profiler = None
        self.calls: Counter = Counter()
        self.elements = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == WARMUP:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   record_shapes=True)
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx != WARMUP + STEPS - 1:  # stops before the epoch's end (its metrics sync once an epoch)
            return
        self.profiler.__exit__(None, None, None)
        for event in self.profiler.events():
            if event.name.startswith("c10d::") and not event.name.startswith(("c10d::barrier", "c10d::broadcast")):
                self.calls[event.name.removeprefix("c10d::").strip("_")] += 1
            elif event.name.startswith("gloo:") and event.input_shapes and event.input_shapes[0]:
                n = 1
                for d in event.input_shapes[0]:
                    n *= d
                self.elements += n


def measure(name: str, strategy: str) -> tuple[float, float, str]:
    make, _ = CONFIGS[name]
    counter = Collectives()
    if strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strat = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    else:
        strat = "ddp"
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strat, max_steps=WARMUP + STEPS,
                         callbacks=[*make(), counter], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # logs every 50 steps: none here
    gen = torch.Generator().manual_seed(0)
    n = 2 * BATCH * (WARMUP + STEPS)
    data = TensorDataset(torch.randn(n, 64, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    pl.seed_everything(0, verbose=False)
    trainer.fit(Net(), DataLoader(data, batch_size=BATCH))
    kinds = ", ".join(f"{k} {v / STEPS:g}" for k, v in sorted(counter.calls.items()))
    return sum(counter.calls.values()) / STEPS, counter.elements * 4 / STEPS / 1e6, kinds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=None, help="semicolon-separated subset of the rows")
    args = parser.parse_args(argv)
    names = args.configs.split(";") if args.configs else list(CONFIGS)
    rows = {}
    for name in names:
        rows[name] = {"ddp": measure(name, "ddp")}
        if CONFIGS[name][1]:
            rows[name]["fsdp2"] = measure(name, "fsdp2")
    if torch.distributed.get_rank() != 0:
        return ""
    lines = ["| step | DDP: collectives | DDP: MB sent | FSDP2: collectives | FSDP2: MB sent |",
             "|---|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cells = []
        for strategy in ("ddp", "fsdp2"):
            calls, mb, _ = row.get(strategy, (None, None, ""))
            cells += ["refused", "—"] if calls is None else [f"{calls:g}", f"{mb:.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per step, per rank; the kinds of collectives:", ""]
    for name, row in rows.items():
        for strategy, (_, _, kinds) in row.items():
            lines.append(f"- {name}, {strategy.upper()}: {kinds}")
    text = "\n".join(lines)
    print(text, flush=True)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
