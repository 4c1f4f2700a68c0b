"""Training configurations for the FSDP2 tests: two small models sharded with ``fully_shard`` in ``configure_model``
(an embedding model for the target-layer methods, a feature model for the batch-input ones), the callbacks under
test, and a fit that runs them on one process or under ``ModelParallelStrategy`` (2 CPU processes, gloo).

Shared by tests/ddp_scripts/fsdp2.py (the 2-process runs) and tests/integration/test_fsdp2.py (the one-process
references).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp import GradientNoiseScale, GradientNormMonitor
from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    VirtualAdversarialTraining,
)
from tests.integration.test_ddp_callbacks import _RankSampler  # rank r takes samples r, r + W, ...: one batch split

PER_RANK_BATCH = 4
STEPS = 3
LR = 0.1
VOCAB, TOKENS, FEATURES = 20, 5, 6

#: name → (model kind, callbacks). "tokens": Embedding → mean → Linear blocks; "features": Linear blocks.
CONFIGS: dict[str, tuple[str, Callable[[], list]]] = {
    "plain_features": ("features", lambda: []),
    "plain_tokens": ("tokens", lambda: []),
    "fgm_input": ("features", lambda: [AdversarialTraining(0.3, adversarial_weight=0.5)]),
    "pgd_input": ("features", lambda: [AdversarialTraining(0.1, norm="linf", steps=2)]),
    "freelb_target": ("tokens", lambda: [AdversarialTraining(0.2, steps=2, average_steps=True, target="embed")]),
    "fgm_target": ("tokens", lambda: [AdversarialTraining(0.3, target="embed")]),
    "data_fd_input": ("features", lambda: [DataGradientPenalty(0.5, method="finite_difference")]),
    "data_auto_target": ("tokens", lambda: [DataGradientPenalty(0.5, power=1, target="embed")]),
    "parameter_global_fd": ("features", lambda: [ParameterGradientPenalty(0.2, scope="global",
                                                                          method="finite_difference")]),
    "parameter_global_auto": ("tokens", lambda: [ParameterGradientPenalty(0.2, scope="global")]),
    "sam_global": ("tokens", lambda: [SharpnessAwareMinimization(0.05, scope="global")]),
    "asam_global": ("features", lambda: [SharpnessAwareMinimization(0.5, adaptive=True, scope="global")]),
    # SAM beside other callbacks: its term is a difference added to the clean gradient the others see
    "sam_fgm_penalty": ("features", lambda: [AdversarialTraining(0.2, adversarial_weight=0.5),
                                             DataGradientPenalty(0.3, method="finite_difference"),
                                             SharpnessAwareMinimization(0.05, scope="global")]),
    # gradient accumulation: each micro-batch's gradients are taken with the earlier ones' put aside
    "sam_accumulated": ("tokens", lambda: [SharpnessAwareMinimization(0.05, scope="global"),
                                           AdversarialTraining(0.2, target="embed")]),
    "parameter_accumulated": ("features", lambda: [ParameterGradientPenalty(0.2, scope="global",
                                                                            method="finite_difference")]),
    # an output layer tied to the embedding (both in the root's FSDP2 unit), and a frozen block
    "sam_tied": ("tied", lambda: [SharpnessAwareMinimization(0.05, scope="global"),
                                  AdversarialTraining(0.2, target="embed")]),
    "parameter_frozen": ("frozen", lambda: [ParameterGradientPenalty(0.2, scope="global",
                                                                     method="finite_difference")]),
    # a Hugging Face GPT-2 language model (SDPA attention, lm_head tied to the token embedding), one unit per block
    "gpt2_fgm_sam": ("gpt2", lambda: [AdversarialTraining(0.5, target="model.transformer.wte"),
                                      SharpnessAwareMinimization(0.05, scope="global")]),
    "gpt2_freelb": ("gpt2", lambda: [AdversarialTraining(0.3, steps=2, average_steps=True,
                                                         target="model.transformer.wte")]),
    # a block the loss does not use: no gradient reaches its shards (zeros in ‖g‖, no update)
    "sam_unused": ("unused", lambda: [SharpnessAwareMinimization(0.05, scope="global"),
                                      DataGradientPenalty(0.3, method="finite_difference")]),
    "grad_norm_recompute": ("features", lambda: [GradientNormMonitor(every_n_steps=1, histograms=False)]),
    "grad_norm_fused": ("features", lambda: [GradientNormMonitor(every_n_steps=1, mode="fused", histograms=False)]),
    "grad_norm_target": ("tokens", lambda: [GradientNormMonitor(every_n_steps=1, target="embed", histograms=False)]),
    # the per-sample norms of each rank's shards of the step and the reduce-scattered gradient: the combined batch
    "noise_scale": ("features", lambda: [GradientNoiseScale(every_n_steps=1, ema=0.9)]),
}
#: Compared with 2-process DDP instead of one process: what is defined per rank (random draws that depend on the
#: rank: VAT's direction, a random PGD start; Flooding, where each rank floods its own loss), and bf16-mixed, whose
#: rounding depends on the batch each rank computes.
VERSUS_DDP: dict[str, tuple[str, Callable[[], list]]] = {
    "fgm_bf16": ("features", lambda: [AdversarialTraining(0.3), DataGradientPenalty(0.3, method="finite_difference")]),
    "flooding": ("features", lambda: [Flooding(1.2)]),
    "vat_input": ("features", lambda: [VirtualAdversarialTraining(0.5, weight=0.5)]),
    "vat_target": ("tokens", lambda: [VirtualAdversarialTraining(0.5, target="embed")]),
    "pgd_random_start": ("features", lambda: [AdversarialTraining(0.1, norm="linf", steps=2, random_start=True)]),
}


#: Configurations with a finite difference (their quotient divides rounding by the step:
#: tests/integration/test_fsdp2.py).
FINITE_DIFFERENCES = {"data_fd_input", "data_auto_target", "parameter_global_fd", "parameter_global_auto",
                      "sam_fgm_penalty", "parameter_accumulated", "parameter_frozen", "sam_unused", "fgm_bf16"}
#: Trainer arguments of a configuration beyond the defaults.
TRAINER: dict[str, dict] = {
    "sam_accumulated": {"accumulate_grad_batches": 2},
    "parameter_accumulated": {"accumulate_grad_batches": 2},
    "fgm_bf16": {"precision": "bf16-mixed"},
}
#: The one-process reference of a configuration whose method FSDP2 resolves otherwise ("auto": finite differences).
REFERENCES: dict[str, Callable[[], list]] = {
    "data_auto_target": lambda: [DataGradientPenalty(0.5, power=1, target="embed", method="finite_difference")],
    "parameter_global_auto": lambda: [ParameterGradientPenalty(0.2, scope="global", method="finite_difference")],
}


class Net(pl.LightningModule):
    """The model of a configuration; ``configure_model`` shards each block and the root when a device mesh exists.

    Kinds: "features" (Linear embedding and blocks), "tokens" (an Embedding, mean over tokens, blocks), "tied" (tokens
    with an output layer tied to the embedding: logits over the vocabulary, both in the root's unit) and "frozen"
    (features with the first block frozen).
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.kind = kind
        tokens = kind in ("tokens", "tied")
        self.embed = torch.nn.Embedding(VOCAB, 8) if tokens else torch.nn.Linear(FEATURES, 8)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 8 if kind == "tied" else 3)])
        if kind == "tied":
            self.head = torch.nn.Linear(8, VOCAB, bias=False)
            self.head.weight = self.embed.weight
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        if kind == "frozen":
            self.blocks[0].requires_grad_(False)
        if kind == "unused":
            self.spare = torch.nn.Linear(8, 8)  # never called

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        spare = (self.spare,) if self.kind == "unused" else ()
        for block in ((*self.blocks,) if self.kind == "tied" else (self.embed, *self.blocks, *spare)):
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)  # the tied embedding and head: one parameter, in the root's unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.kind in ("tokens", "tied"):
            h = h.mean(dim=1)
        h = self.blocks[1](torch.tanh(self.blocks[0](torch.tanh(h))))
        return self.head(torch.tanh(h)) if self.kind == "tied" else h

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


class GPT2(pl.LightningModule):
    """``transformers.GPT2LMHeadModel`` from a tiny local config (no download), the batch's tokens as labels."""

    def __init__(self) -> None:
        super().__init__()
        import transformers

        torch.manual_seed(2)
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        self.model = transformers.GPT2LMHeadModel(config)

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.transformer.h:
            fully_shard(block, mesh=mesh)
        # the root unit is the model training_step calls: its forward all-gathers the tied embedding and lm_head,
        # the position embeddings and the final LayerNorm
        fully_shard(self.model, mesh=mesh)

    def training_step(self, batch, batch_idx):
        ids, _ = batch
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=0.9)


def data(kind: str, nan: bool = False) -> TensorDataset:
    """The configuration's samples; ``nan``: one NaN feature in a sample rank 1 takes at step 1."""
    gen = torch.Generator().manual_seed(1)
    n = 2 * PER_RANK_BATCH * STEPS  # one epoch is STEPS steps: a resumed run starts at an epoch boundary
    x = (torch.randint(0, VOCAB, (n, TOKENS), generator=gen) if kind in ("tokens", "tied", "gpt2")
         else torch.randn(n, FEATURES, generator=gen))
    if nan:
        x[2 * PER_RANK_BATCH + 3, 1] = float("nan")  # odd: rank 1's; in the second block of 2·PER_RANK_BATCH
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=gen))


def fit(name: str, *, strategy: str = "single", max_steps: int = STEPS, ckpt_path: str | None = None,
        callbacks: list | None = None, reference: bool = False, nan: bool = False, model: Net | None = None,
        **trainer_kwargs) -> tuple[pl.Trainer, Net]:
    """Fit configuration ``name`` with ``strategy`` "single" (one process, the combined batch), "fsdp2", "tp2"
    (``tensor_parallel_size=2``) or "ddp"; ``reference``: with the one-process reference's callbacks."""
    kind, make = {**CONFIGS, **VERSUS_DDP}[name]
    if reference:
        make = REFERENCES.get(name, make)
    if strategy in ("fsdp2", "tp2"):
        from lightning.pytorch.strategies import ModelParallelStrategy

        dp, tp = (2, 1) if strategy == "fsdp2" else (1, 2)
        # a hang (a rank left waiting in a collective) becomes an error after a minute
        kwargs = dict(devices=2, strategy=ModelParallelStrategy(data_parallel_size=dp, tensor_parallel_size=tp,
                                                                timeout=timedelta(seconds=60)))
        batch = PER_RANK_BATCH
    elif strategy == "ddp":
        kwargs, batch = dict(devices=2, strategy="ddp"), PER_RANK_BATCH
    else:
        kwargs, batch = dict(devices=1), 2 * PER_RANK_BATCH
    pl.seed_everything(0, verbose=False)
    model = (GPT2() if kind == "gpt2" else Net(kind)) if model is None else model
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", callbacks=make() + (callbacks or []),
                         use_distributed_sampler=False, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1,
                         **{"enable_checkpointing": False, **kwargs, **TRAINER.get(name, {}), **trainer_kwargs})
    ds = data(kind, nan)
    trainer.fit(model, DataLoader(ds, batch_size=batch, sampler=_RankSampler(len(ds))), ckpt_path=ckpt_path)
    return trainer, model


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters as whole tensors (a sharded one gathered)."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def logged(trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.callback_metrics.items()}
