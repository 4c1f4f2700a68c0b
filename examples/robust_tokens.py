"""Embedding-space robustness of a small transformer on digits read as tokens: five trainings, one callback each.

Every 8×8 digit of scikit-learn becomes a sequence of 65 token ids: a class token (id 17, like BERT's
[CLS]) followed by the 64 pixel values 0–16, so the vocabulary has 18 ids. One ordinary LightningModule (token
+ learned position embeddings in ``embed``, a 2-layer ``nn.TransformerEncoder`` of width 64, a linear head on
the class token) is trained

- ``plain``: no callback;
- ``fgm``: ``AdversarialTraining(ε, steps=1, norm="l2", adversarial_weight=0.5, target="embed")``, FGM on the
  embeddings (Miyato et al. 2017): the mean of the clean and the adversarial loss;
- ``freelb``: ``AdversarialTraining(ε, steps=3, average_steps=True, target="embed")``, FreeLB (Zhu et al.
  2020): the mean loss over 3 ascent points of the embeddings;
- ``vat``: ``VirtualAdversarialTraining(ε, weight=1.0, target="embed", logits_fn=...)``, the label-free
  smoothness term of Miyato et al. 2018;
- ``data_penalty``: ``DataGradientPenalty(λ, power=1, target="embed")``, λ·mean‖∇ₑℓᵢ‖ on the embeddings
  (FGM's first-order twin),

then evaluated on the 450 held-out digits: clean accuracy, accuracy under PGD-10 on the embeddings (l2 ball of
radius ε = 1 per sequence over its (T, D) slice, step 2.5ε/10, from δ = 0; both embedding tables are N(0, 1),
so a sequence's embedding has norm ≈ 90), and accuracy when ``k`` random pixels
are moved by ±1–4 intensity levels (clipped to 0–16; one fixed draw for every run). The perturbations are
additive δ on the output of ``embed`` (token + position embeddings), the same site for training and attack.
The script prints a Markdown table (mean ± sd over the seeds, Δ paired by seed against ``plain``), writes it
to ``<out_dir>/results.md``, saves a bar chart to ``<out_dir>/robust_tokens.png`` and logs both to W&B.

Run from the repository root (or ``python examples/robust_tokens.py ...`` with the package installed)::

    python -m examples.robust_tokens                        # one seed, five trainings
    python -m examples.robust_tokens --seeds '[0, 1, 2]'    # the spread over three seeds
    python -m examples.robust_tokens --epochs 3 --logger none --variants '[plain, fgm]'
    python -m examples.robust_tokens --model bert           # Hugging Face BertForSequenceClassification
    python -m examples.robust_tokens --print_config > tokens.yaml   # then: --config tokens.yaml
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_gp import AdversarialTraining, DataGradientPenalty, VirtualAdversarialTraining
from lightning_gp.functional import perturbed_output, pgd

try:
    from examples._digits import N_CLASSES, SplitLoaders, digits_tensors, log_summary, make_logger
except ImportError:  # run as a file: python examples/robust_tokens.py (lightning_gp installed)
    from _digits import N_CLASSES, SplitLoaders, digits_tensors, log_summary, make_logger  # type: ignore[no-redef]

CLS_ID = 17  # pixel values are the ids 0..16
VOCAB = 18
SEQ_LEN = 65

Variant = Literal["plain", "fgm", "freelb", "vat", "data_penalty"]
VARIANTS: tuple[Variant, ...] = ("plain", "fgm", "freelb", "vat", "data_penalty")
LABELS = {
    "plain": "plain",
    "fgm": "FGM (embeddings)",
    "freelb": "FreeLB-3",
    "vat": "VAT",
    "data_penalty": "data penalty",
}
PROJECT = "lightning-gp-robust-tokens"


# --------------------------------------------------------------------------------------------- data


def to_tokens(x: Tensor) -> Tensor:
    """Digits scaled to [0, 1] (N, 64) → token ids (N, 65): the class token, then the pixel counts 0..16."""
    pixels = (x * 16).round().long()
    return torch.cat([torch.full((x.shape[0], 1), CLS_ID, dtype=torch.long), pixels], dim=1)


def corrupt_tokens(ids: Tensor, k: int, *, max_shift: int = 4, seed: int = 1234) -> Tensor:
    """``ids`` with ``k`` random pixel tokens per sequence (never the class token) moved by ±1..``max_shift``.

    Values are clipped to 0..16; the draw is a function of ``seed`` only, so every run sees the same
    corrupted test set.

    Example::

        >>> ids = to_tokens(torch.full((2, 64), 0.5))
        >>> bad = corrupt_tokens(ids, 8)
        >>> [int((bad[i] != ids[i]).sum()) for i in range(2)], int(bad[:, 0].eq(CLS_ID).sum())
        ([8, 8], 2)
    """
    g = torch.Generator().manual_seed(seed)
    n, t = ids.shape
    positions = torch.rand(n, t - 1, generator=g).argsort(dim=1)[:, :k] + 1  # k distinct pixels, not CLS
    magnitude = torch.randint(1, max_shift + 1, (n, k), generator=g)
    sign = torch.randint(0, 2, (n, k), generator=g) * 2 - 1
    out = ids.clone()
    moved = (out.gather(1, positions) + sign * magnitude).clamp(0, 16)
    return out.scatter(1, positions, moved)


class TokenDigits(Dataset):
    """Dict samples ``{input_ids, attention_mask, labels[, corrupted_ids]}``; every position is real."""

    def __init__(self, ids: Tensor, labels: Tensor, corrupted: Tensor | None = None) -> None:
        self.ids, self.labels, self.corrupted = ids, labels, corrupted
        self.mask = torch.ones_like(ids)

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        item = {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}
        if self.corrupted is not None:
            item["corrupted_ids"] = self.corrupted[i]
        return item


class TokenDigitsDataModule(SplitLoaders, L.LightningDataModule):
    """The digits split of ``examples/_digits.py`` (1347 train / 450 test, fixed) as token-id batches.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size of the validation/test loaders.
        corrupt_k: pixels moved per test sequence for the corruption accuracy.
        train_subset: keep only the first n training digits (for quick tests); None keeps all.
        test_subset: likewise for the test digits.
    """

    def __init__(self, batch_size: int = 64, eval_batch_size: int = 150, corrupt_k: int = 8,
                 train_subset: int | None = None, test_subset: int | None = None) -> None:
        super().__init__()
        self.batch_size, self.eval_batch_size, self.corrupt_k = batch_size, eval_batch_size, corrupt_k
        self.train_subset, self.test_subset = train_subset, test_subset
        self.train_set: TokenDigits | None = None
        self.test_set: TokenDigits | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            x_tr, y_tr, x_te, y_te = digits_tensors()
            x_tr, y_tr = x_tr[: self.train_subset], y_tr[: self.train_subset]
            x_te, y_te = x_te[: self.test_subset], y_te[: self.test_subset]
            ids_te = to_tokens(x_te)
            self.train_set = TokenDigits(to_tokens(x_tr), y_tr)
            self.test_set = TokenDigits(ids_te, y_te, corrupt_tokens(ids_te, self.corrupt_k))


# -------------------------------------------------------------------------------------------- model


class TokenEmbedding(nn.Module):
    """Token + learned position embeddings: the (B, T, D) output that the callbacks and the attack perturb."""

    def __init__(self, vocab: int, length: int, dim: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.positions)  # N(0, 1) like the token table: position is as loud as intensity

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.tokens(input_ids) + self.positions[:, : input_ids.shape[1]]


class TokenTransformer(L.LightningModule):
    """An ordinary token classifier: nothing in it knows about penalties or attacks.

    ``model="transformer"``: ``embed`` → ``nn.TransformerEncoder`` (pre-LN) → final LayerNorm → the class
    token → ``Linear(10)``. ``model="bert"``: ``transformers.BertForSequenceClassification`` from a local
    ``BertConfig`` of the same size (no download); its ``bert.embeddings`` (token + position + type
    embeddings, LayerNorm) is the perturbed site. :attr:`embedding_path` names the site for ``target=``.

    ``attention_math=True`` runs attention with PyTorch's math kernel: the CPU flash kernel has no double
    backward, which ``DataGradientPenalty`` needs (the function computed is the same).

    The test loop runs PGD on the embeddings, which needs gradients: the Trainer is built with
    ``inference_mode=False`` and ``test_step`` re-enables autograd around the attack.
    """

    def __init__(
        self,
        model: Literal["transformer", "bert"] = "transformer",
        dim: int = 64,
        layers: int = 2,
        heads: int = 4,
        ff_dim: int = 128,
        dropout: float = 0.0,
        lr: float = 3e-3,
        weight_decay: float = 0.01,
        epsilon: float = 1.0,
        pgd_steps: int = 10,
        attention_math: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if model == "bert":
            from transformers import BertConfig, BertForSequenceClassification

            config = BertConfig(
                vocab_size=VOCAB, hidden_size=dim, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ff_dim, max_position_embeddings=SEQ_LEN, type_vocab_size=1,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, num_labels=N_CLASSES,
                attn_implementation="eager",
            )
            self.bert = BertForSequenceClassification(config)
            self.embedding_path = "bert.bert.embeddings"
        else:
            self.embed = TokenEmbedding(VOCAB, SEQ_LEN, dim)
            layer = nn.TransformerEncoderLayer(dim, heads, ff_dim, dropout=dropout, batch_first=True,
                                               norm_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, N_CLASSES)
            self.embedding_path = "embed"
        self.val_acc = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_clean = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_robust = MulticlassAccuracy(N_CLASSES, average="micro")
        self.test_corrupt = MulticlassAccuracy(N_CLASSES, average="micro")

    @property
    def embedding(self) -> nn.Module:
        return self.get_submodule(self.embedding_path)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        kernel = contextlib.nullcontext()
        if self.hparams.attention_math:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = sdpa_kernel(SDPBackend.MATH)
        with kernel:
            if self.hparams.model == "bert":
                return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits
            pad = None if attention_mask is None else attention_mask == 0
            h = self.encoder(self.embed(input_ids), src_key_padding_mask=pad)
            return self.head(self.norm(h[:, 0]))  # the class token

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.val_acc(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("val/acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids, mask, y = batch["input_ids"], batch["attention_mask"], batch["labels"]
        steps = self.hparams.pgd_steps
        delta = embedding_pgd(self, batch, epsilon=self.hparams.epsilon, steps=steps)
        with torch.no_grad():
            self.test_clean(self(ids, mask), y)
            with perturbed_output(self.embedding, delta, mask=mask):
                self.test_robust(self(ids, mask), y)
            self.test_corrupt(self(batch["corrupted_ids"], mask), y)
        self.log("test/clean_acc", self.test_clean)
        self.log(f"test/pgd{steps}_acc", self.test_robust)
        self.log("test/corrupt_acc", self.test_corrupt)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        total = self.trainer.estimated_stepping_batches
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr, total_steps=total,
                                                        pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def logits_of(module: TokenTransformer, batch: dict[str, Tensor]) -> Tensor:
    """``logits_fn`` of ``VirtualAdversarialTraining``: the model's logits on a dict batch."""
    return module(batch["input_ids"], batch["attention_mask"])


def embedding_loss(model: TokenTransformer, batch: dict[str, Tensor], delta: Tensor) -> Tensor:
    """Per-sequence cross-entropy (B,) with ``delta`` added to the embedding output."""
    with perturbed_output(model.embedding, delta, mask=batch["attention_mask"]):
        logits = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(logits, batch["labels"], reduction="none")


def embedding_pgd(model: TokenTransformer, batch: dict[str, Tensor], *, epsilon: float, steps: int = 10,
                  step_size: float | None = None, random_start: bool = False) -> Tensor:
    """PGD on the embedding output: δ (B, T, D) in the l2 ball of radius ε per sequence, maximising the loss.

    ``lightning_gp.functional.pgd`` on δ itself (starting at 0): each step moves δ by ``step_size`` (default
    2.5ε/steps) along ∇_δℓᵢ/‖∇_δℓᵢ‖ and projects it back onto the ball, per sequence. Parameter ``.grad`` is
    never touched. Returns the detached δ.
    """
    with torch.no_grad(), perturbed_output(model.embedding) as record:  # the shape of the embedding output
        model(batch["input_ids"], batch["attention_mask"])
    zeros = record.output.new_zeros(record.output.shape)
    if epsilon == 0 or steps == 0:
        return zeros
    with torch.enable_grad():
        delta = pgd(lambda d: embedding_loss(model, batch, d), zeros, epsilon=epsilon, norm="l2", steps=steps,
                    step_size=2.5 * epsilon / steps if step_size is None else step_size, random_start=random_start)
    return delta.detach()


# ------------------------------------------------------------------------------------------ the runs


def make_callbacks(variant: Variant, target: str, *, train_epsilon: float, vat_epsilon: float,
                   vat_weight: float, data_weight: float, data_power: float) -> list[Callback]:
    """The only thing that differs between the five runs."""
    if variant == "fgm":
        return [AdversarialTraining(train_epsilon, steps=1, norm="l2", adversarial_weight=0.5, target=target)]
    if variant == "freelb":
        return [AdversarialTraining(train_epsilon, steps=3, norm="l2", average_steps=True, target=target)]
    if variant == "vat":
        return [VirtualAdversarialTraining(vat_epsilon, weight=vat_weight, target=target, logits_fn=logits_of)]
    if variant == "data_penalty":
        return [DataGradientPenalty(data_weight, power=data_power, target=target)]
    return []


def summarize(results: list[dict], variants: list[Variant], seeds: list[int], *, steps: int = 10,
              epsilon: float = 1.0, corrupt_k: int = 8, title: str = "Token transformer") -> tuple[str, dict]:
    """Markdown table (mean ± sd over seeds; Δ paired by seed against plain) and the per-variant stats."""

    def spread(values: list[float]) -> tuple[float, float]:
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    by = {(r["variant"], r["seed"]): r for r in results}
    keys = ("clean", "robust", "corrupt")
    sd = len(seeds) > 1
    fmt = lambda p: f"{p[0]:.1f} ± {p[1]:.1f}" if sd else f"{p[0]:.1f}"  # noqa: E731
    signed = lambda p: (f"{p[0]:+.1f} ± {p[1]:.1f}" if sd else f"{p[0]:+.1f}") if p else ""  # noqa: E731
    lines = [
        f"{title}, test set of {results[0].get('n_test', 450)}; PGD-{steps} on the embeddings, l2 ε = {epsilon} "
        f"per sequence; corruption: {corrupt_k} pixels ±1–4. "
        + (f"Mean ± sd over seeds {seeds} (Δ: paired by seed)." if sd else f"Seed {seeds[0]}."),
        "",
        f"| training | clean acc % | PGD-{steps} acc % | corrupted acc % | Δ clean vs plain "
        f"| Δ PGD-{steps} vs plain | fit s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    stats: dict[str, dict] = {}
    for v in variants:
        values = {k: [100 * by[(v, s)][k] for s in seeds] for k in keys}
        row: dict[str, Any] = {k: spread(values[k]) for k in keys}
        row["seconds"] = statistics.fmean(by[(v, s)]["seconds"] for s in seeds)
        if "plain" in variants and v != "plain":
            for k in ("clean", "robust"):
                base = [100 * by[("plain", s)][k] for s in seeds]
                row[f"d_{k}"] = spread([a - b for a, b in zip(values[k], base, strict=True)])
        stats[v] = row
        lines.append(
            f"| {LABELS[v]} | {fmt(row['clean'])} | {fmt(row['robust'])} | {fmt(row['corrupt'])} "
            f"| {signed(row.get('d_clean'))} | {signed(row.get('d_robust'))} | {row['seconds']:.0f} |"
        )
    if sd:
        lines += ["", f"Per seed (clean / PGD-{steps} / corrupted %):", "",
                  "| training | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
        for v in variants:
            cells = [" / ".join(f"{100 * by[(v, s)][k]:.1f}" for k in keys) for s in seeds]
            lines.append(f"| {LABELS[v]} | " + " | ".join(cells) + " |")
    return "\n".join(lines), stats


def bar_chart(stats: dict, path: Path, title: str, attack: str = "PGD-10", corruption: str = "corrupted") -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside tests and on servers
    import matplotlib.pyplot as plt

    names = list(stats)
    pos = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for offset, key, label in ((-width, "clean", "clean"), (0.0, "robust", attack), (width, "corrupt", corruption)):
        means = [stats[n][key][0] for n in names]
        errs = [stats[n][key][1] for n in names]
        bars = ax.bar([p + offset for p in pos], means, width, yerr=errs if any(errs) else None, capsize=3,
                      label=label)
        ax.bar_label(bars, fmt="%.0f", padding=2, fontsize=8)
    ax.set_xticks(list(pos), [LABELS[n] for n in names])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 118)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper center", ncol=3, frameon=False, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(
    epochs: int = 15,
    seeds: list[int] | None = None,
    variants: list[Variant] | None = None,
    model: Literal["transformer", "bert"] = "transformer",
    dim: int = 64,
    layers: int = 2,
    dropout: float = 0.0,
    lr: float = 3e-3,
    batch_size: int = 64,
    epsilon: float = 1.0,
    pgd_steps: int = 10,
    corrupt_k: int = 8,
    train_epsilon: float | None = None,
    vat_epsilon: float | None = None,
    vat_weight: float = 1.0,
    data_weight: float | None = None,
    data_power: float = 1,
    train_subset: int | None = None,
    test_subset: int | None = None,
    logger: Literal["wandb", "csv", "none"] = "wandb",
    out_dir: str = "robust_tokens_out",
    progress_bar: bool = True,
    accelerator: str = "cpu",
    threads: int | None = 1,
) -> dict:
    """Train the transformer once per variant and seed, attack its embeddings with PGD, print and save the table.

    Args:
        epochs: training epochs of every run (1347 training digits, ``batch_size`` per step; one-cycle LR).
        seeds: one run per variant and seed (default [0]); ``L.seed_everything(seed)`` before each, so the runs
            of a seed start from the same weights and batch order.
        variants: which trainings to run (default: all five; ``plain`` is needed for the Δ columns).
        model: ``transformer`` (``nn.TransformerEncoder``) or ``bert`` (``BertForSequenceClassification``
            from a local config of the same size).
        dim: model width d (embeddings, attention); the feed-forward width is 2d, 4 heads.
        layers: encoder layers.
        dropout: dropout of the encoder layers.
        lr: peak AdamW learning rate (one-cycle schedule).
        batch_size: training batch size.
        epsilon: l2 radius of the PGD evaluation attack per sequence, over its (T, D) embedding slice.
        pgd_steps: PGD iterations of the evaluation attack (step 2.5·ε/steps, from δ = 0).
        corrupt_k: pixels per test digit moved by ±1–4 intensity levels for the corruption accuracy.
        train_epsilon: ε of FGM and FreeLB training (default ``epsilon``).
        vat_epsilon: ε of VAT (default ``epsilon``).
        vat_weight: weight α of the VAT term.
        data_weight: λ of ``DataGradientPenalty`` (default ε/2: FGM's mean of clean and adversarial loss is, to
            first order, L + (ε/2)·mean‖∇ₑℓᵢ‖).
        data_power: 1 (λ·mean‖∇ₑℓᵢ‖) or 2 (double backpropagation, λ·mean‖∇ₑℓᵢ‖²).
        train_subset: train on the first n digits only (quick tests).
        test_subset: evaluate on the first n test digits only (quick tests).
        logger: ``wandb`` (offline: files under ``out_dir``, sync later with ``wandb sync``), ``csv`` or
            ``none``.
        out_dir: where the table, the chart and the logs go.
        progress_bar: show Lightning's progress bar.
        accelerator: passed to the Trainer ("cpu" is fastest for this tiny model).
        threads: ``torch.set_num_threads``; None leaves PyTorch's default (the matrices are too small to gain
            from intra-op parallelism on a busy machine).

    Returns:
        ``{"results": [...per run...], "stats": {...per variant...}, "table": str, "chart": path}``.
    """
    seeds = [0] if seeds is None else list(seeds)
    if threads is not None:
        torch.set_num_threads(threads)
    variants = list(VARIANTS) if variants is None else list(variants)
    train_epsilon = epsilon if train_epsilon is None else train_epsilon
    vat_epsilon = epsilon if vat_epsilon is None else vat_epsilon
    data_weight = epsilon / 2 if data_weight is None else data_weight
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    group = f"robust-tokens-{time.strftime('%Y%m%d-%H%M%S')}"
    datamodule = TokenDigitsDataModule(batch_size=batch_size, corrupt_k=corrupt_k, train_subset=train_subset,
                                       test_subset=test_subset)
    results = []
    for seed in seeds:
        for variant in variants:
            L.seed_everything(seed, workers=True)
            net = TokenTransformer(model=model, dim=dim, layers=layers, ff_dim=2 * dim, dropout=dropout, lr=lr,
                                   epsilon=epsilon, pgd_steps=pgd_steps, attention_math=variant == "data_penalty")
            callbacks = make_callbacks(variant, net.embedding_path, train_epsilon=train_epsilon,
                                       vat_epsilon=vat_epsilon, vat_weight=vat_weight, data_weight=data_weight,
                                       data_power=data_power)
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator=accelerator,
                devices=1,
                callbacks=callbacks,
                logger=make_logger(logger, out, f"{variant}-seed{seed}", group, PROJECT, variant),
                inference_mode=False,  # the test loop runs PGD, which needs gradients
                check_val_every_n_epoch=max(1, min(10, epochs)),
                num_sanity_val_steps=0,
                log_every_n_steps=10,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=progress_bar,
                default_root_dir=str(out),
            )
            print(f"\n=== {LABELS[variant]}, seed {seed} ===", flush=True)
            start = time.perf_counter()
            trainer.fit(net, datamodule=datamodule)
            seconds = time.perf_counter() - start
            (metrics,) = trainer.test(net, datamodule=datamodule, verbose=False)
            results.append({
                "variant": variant, "seed": seed, "seconds": seconds, "n_test": len(datamodule.test_set),
                "clean": float(metrics["test/clean_acc"]), "robust": float(metrics[f"test/pgd{pgd_steps}_acc"]),
                "corrupt": float(metrics["test/corrupt_acc"]),
            })
            print(f"clean {results[-1]['clean']:.3f}  PGD-{pgd_steps} {results[-1]['robust']:.3f}  "
                  f"corrupted {results[-1]['corrupt']:.3f}  ({seconds:.0f} s)", flush=True)
            if logger == "wandb":
                import wandb

                wandb.finish()  # else the next WandbLogger would attach to this run

    title = f"{'BERT' if model == 'bert' else 'Transformer'} on digit tokens, {epochs} epochs"
    table, stats = summarize(results, variants, seeds, steps=pgd_steps, epsilon=epsilon, corrupt_k=corrupt_k,
                             title=title)
    print("\n" + table, flush=True)
    (out / "results.md").write_text(table + "\n")
    chart = bar_chart(stats, out / "robust_tokens.png", f"{title}, {len(seeds)} seed(s)",
                      f"PGD-{pgd_steps} (embeddings, l2 ε={epsilon})", f"{corrupt_k} pixels ±1–4")
    print(f"\nwrote {out / 'results.md'} and {chart}", flush=True)
    if logger == "wandb":
        columns = ["training", "seed", "clean_acc", "pgd_acc", "corrupt_acc", "fit_seconds"]
        rows = [[r["variant"], r["seed"], r["clean"], r["robust"], r["corrupt"], r["seconds"]] for r in results]
        log_summary(PROJECT, group, out, {"accuracy_chart": chart}, (columns, rows))
    if any(not math.isfinite(r["clean"]) for r in results):
        raise FloatingPointError("a run ended with a non-finite accuracy")
    return {"results": results, "stats": stats, "table": table, "chart": str(chart)}


def cli(args: list[str] | None = None) -> dict:
    """The command line: every argument of :func:`main` as ``--name value``, plus ``--config file.yaml``."""
    from jsonargparse import CLI

    return CLI(main, args=args, as_positional=False)


if __name__ == "__main__":
    cli()
