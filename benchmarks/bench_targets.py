"""Step time of the embedding-target callbacks (FGM, FreeLB, VAT) in a Trainer, against hand-written loops.

Setting: a small transformer classifier over token ids: ``nn.Embedding(1000, 128)`` (+ learned positions)
→ ``nn.TransformerEncoder`` (2 layers, 4 heads, batch_first, dropout 0) → masked mean pooling → ``Linear``;
dict batches ``{input_ids, attention_mask, labels}``, B = 64, T = 64, Zipf-distributed token ids, each
sequence padded after a random length in [T/2, T]; SGD; ε = 1.

Every configuration is an ordinary ``Trainer(max_steps=...)`` fit of a LightningModule, timed per step from
``on_train_batch_start`` to ``on_train_batch_end`` (the training step, every extra pass, backward, optimizer
step, zero_grad, logging) on one batch already in memory, so Trainer start-up and data loading are excluded:

- *plain*: the module's own loss;
- *FGM, callback*: ``AdversarialTraining(ε, steps=1, adversarial_weight=0.5, target="embed")``;
  *FGM, hand-written*: a module whose ``training_step`` does it by hand: a forward hook adds a zero leaf δ to
  the embedding output, g = autograd.grad(clean, δ, retain_graph=True), r = ε·g/‖g‖ per sequence (masked),
  a second pass with r added, returns 0.5·(clean + adv);
- *FreeLB, callback*: ``AdversarialTraining(ε, steps=3, average_steps=True, target="embed")``; *hand-written*:
  K = 3 losses at δ₀ = 0, δ₁, δ₂ (δ ← Π_ε(δ + α·g/‖g‖), g by autograd.grad with retain_graph, α = 2.5ε/K, the
  callback's default), objective the mean of the K losses, one backward;
- *VAT*: ``VirtualAdversarialTraining(ε, target="embed", logits_fn=...)`` (one power iteration; report only);
- *popular FGM snippet*: the widely copied ``FGM`` class (``attack``: ``param.data.add_(ε·grad/‖grad‖)`` on the
  embedding *weight*, one global norm; ``restore``), with manual optimization: backward of the clean loss,
  attack, backward of the adversarial loss, restore, step (report only).

Method: interleaved rounds. In each round every configuration runs one fit (a fresh Trainer and model), the
order rotated from round to round, so drifts in machine load hit all alike; the first ``warmup`` steps of
each fit are dropped and the round's time of a configuration is the median of its kept steps. A ratio is
formed *within* a round (against the plain step, or the hand-written loop, of the same round); the table
gives the median of the per-round ratios and their spread (min–max over the rounds).

:func:`perturbation_stats` (printed after the table) measures what the snippet perturbs compared with the
callback: the per-sequence norm ‖δᵢ‖ of the change of the encoder's input, its dependence on the rest of
the batch, and the perturbation of repeated tokens.

Run::

    python -m benchmarks.bench_targets               # 6 rounds of 8 kept steps (2 warm-up) per fit
    python -m benchmarks.bench_targets --quick       # 2 rounds of 3 (1 warm-up): a smoke test
    python -m benchmarks.bench_targets --threads 2 --rounds 4 --steps 5
"""

from __future__ import annotations

import argparse
import logging
import statistics
import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from benchmarks.bench_callbacks import RepeatedBatch, StepTimer
from lightning_gp.callbacks import AdversarialTraining, VirtualAdversarialTraining
from lightning_gp.manual import penalized_loss

VOCAB, D, HEADS, LAYERS, CLASSES = 1000, 128, 4, 2, 2
B, T = 64, 64
#: "encoder": ``nn.TransformerEncoder``; "gpt2": Hugging Face's ``GPT2Model`` from a local config (no download)
ARCH = "encoder"
EPS = 1.0
K = 3
WEIGHT = 0.5
TARGET = 1.05


# --------------------------------------------------------------------------------------------- model, data


class TokenClassifier(L.LightningModule):
    """Embedding → 2-layer transformer encoder → masked mean pooling → linear; an ordinary module."""

    def __init__(self) -> None:
        super().__init__()
        if ARCH == "gpt2":  # its token embedding is ``embed`` too (the same module under two names)
            from transformers import GPT2Config, GPT2Model

            config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=D, n_layer=LAYERS, n_head=HEADS,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
            self.gpt = GPT2Model(config)
            self.embed = self.gpt.wte
        else:
            self.embed = nn.Embedding(VOCAB, D, padding_idx=0)
            self.pos = nn.Parameter(torch.randn(T, D) * 0.02)
            layer = nn.TransformerEncoderLayer(D, HEADS, dim_feedforward=4 * D, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)
        self.head = nn.Linear(D, CLASSES)

    def logits(self, batch: dict) -> Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if ARCH == "gpt2":
            h = self.gpt(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            h = self.encoder(self.embed(ids) + self.pos[: ids.shape[1]], src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))

    def loss(self, batch: dict) -> Tensor:
        return F.cross_entropy(self.logits(batch), batch["labels"])

    def training_step(self, batch, batch_idx):
        return self.loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def make_batch(b: int | None = None, seed: int = 0) -> dict[str, Tensor]:
    """``b`` (default :data:`B`) sequences of Zipf-distributed token ids in 1..VOCAB−1 (0 is padding), lengths
    uniform in [T/2, T]."""
    b = B if b is None else b
    gen = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, VOCAB, dtype=torch.float64)
    ids = torch.multinomial(zipf, b * T, replacement=True, generator=gen).view(b, T) + 1
    lengths = torch.randint(T // 2, T + 1, (b,), generator=gen)
    mask = (torch.arange(T) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask,
            "labels": torch.randint(0, CLASSES, (b,), generator=gen)}


# ------------------------------------------------------------------------------------- hand-written steps


def _per_seq_unit(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1)


def _project(delta: Tensor, eps: float) -> Tensor:
    n = delta.flatten(1).norm(dim=1).view(-1, 1, 1)
    return delta * torch.clamp(eps / n.clamp_min(1e-12), max=1.0)


class HandFGM(TokenClassifier):
    """Per-sequence FGM on the embedding output, written by hand in ``training_step``."""

    def _loss_with(self, batch: dict, hook: Callable) -> Tensor:
        handle = self.embed.register_forward_hook(hook)
        try:
            return self.loss(batch)
        finally:
            handle.remove()

    def leaf_loss(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """The loss with a zero leaf δ added to the embedding output e, δ, and e (detached)."""
        leaf: list[Tensor] = []

        def zero_leaf(module, args, out):
            leaf.extend([torch.zeros_like(out, requires_grad=True), out.detach()])
            return out + leaf[0]

        loss = self._loss_with(batch, zero_leaf)
        return loss, leaf[0], leaf[1]

    def clean_and_perturbation(self, batch: dict, keep_graph: bool = True) -> tuple[Tensor, Tensor]:
        """The clean loss (with its graph if ``keep_graph``) and r = ε·g/‖g‖ per sequence, masked."""
        mask = batch["attention_mask"].unsqueeze(-1).float()
        clean, delta, _ = self.leaf_loss(batch)
        (g,) = torch.autograd.grad(clean, delta, retain_graph=keep_graph)
        return clean, EPS * _per_seq_unit(g * mask)

    def training_step(self, batch, batch_idx):
        clean, r = self.clean_and_perturbation(batch)
        adv = self._loss_with(batch, lambda module, args, out: out + r)
        return WEIGHT * (clean + adv)


class HandFreeLB(HandFGM):
    """FreeLB by hand: K losses at δ₀ = 0 … δ_{K−1}, their mean, one backward."""

    def training_step(self, batch, batch_idx):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        alpha = 2.5 * EPS / K
        delta = None
        losses = []
        for t in range(K):
            leaf: list[Tensor] = []

            def add(module, args, out, delta=delta, leaf=leaf):
                d = torch.zeros_like(out, requires_grad=True) if delta is None else delta.requires_grad_(True)
                leaf.append(d)
                return out + d

            losses.append(self._loss_with(batch, add))
            if t < K - 1:
                (g,) = torch.autograd.grad(losses[-1], leaf[0], retain_graph=True)
                delta = _project(leaf[0].detach() + alpha * _per_seq_unit(g * mask), EPS)
        return sum(losses) / K


class SnippetFGM(TokenClassifier):
    """The popular FGM snippet (perturb the embedding weight by ε·grad/‖grad‖), manual optimization."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.backup: dict[str, Tensor] = {}

    def attack(self, epsilon: float = EPS, emb_name: str = "embed.") -> None:
        for name, param in self.named_parameters():
            if param.requires_grad and emb_name in name:
                self.backup[name] = param.data.clone()
                norm = torch.norm(param.grad)
                if norm != 0 and not torch.isnan(norm):
                    param.data.add_(epsilon * param.grad / norm)

    def restore(self, emb_name: str = "embed.") -> None:
        for name, param in self.named_parameters():
            if param.requires_grad and emb_name in name:
                param.data = self.backup[name]
        self.backup = {}

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = self.loss(batch)
        self.manual_backward(loss)
        self.attack()
        self.manual_backward(self.loss(batch))
        self.restore()
        opt.step()
        opt.zero_grad()


def _vat() -> Callback:
    return VirtualAdversarialTraining(EPS, target="embed", logits_fn=lambda module, batch: module.logits(batch))


#: name → (module class, callback factory or None).
CONFIGS: dict[str, tuple[type[TokenClassifier], Callable[[], Callback] | None]] = {
    "plain": (TokenClassifier, None),
    "FGM, hand-written": (HandFGM, None),
    "FGM, callback": (TokenClassifier, lambda: AdversarialTraining(EPS, steps=1, adversarial_weight=WEIGHT,
                                                                   target="embed")),
    "FreeLB K=3, hand-written": (HandFreeLB, None),
    "FreeLB K=3, callback": (TokenClassifier, lambda: AdversarialTraining(EPS, steps=K, average_steps=True,
                                                                          target="embed")),
    "VAT, callback": (TokenClassifier, _vat),
    "popular FGM snippet (weight)": (SnippetFGM, None),
}
#: callback row → its hand-written row (the ratio with the target).
HAND = {"FGM, callback": "FGM, hand-written", "FreeLB K=3, callback": "FreeLB K=3, hand-written"}


# ----------------------------------------------------------------------------------------------- timing


def fit_chunk(name: str, batch: dict, steps: int) -> list[float]:
    """Per-step times of one short fit of configuration ``name``: fresh Trainer and model (same init)."""
    return fit_steps(*CONFIGS[name], batch, steps)


def fit_steps(cls: type[L.LightningModule], factory: Callable[[], Callback] | None, batch: dict,
              steps: int) -> list[float]:
    """Per-step times of one short fit of ``cls()`` with ``factory()``'s callback: fresh Trainer and model."""
    torch.manual_seed(0)
    module = cls()
    timer = StepTimer(torch.device("cpu"))
    callbacks = [timer] + ([factory()] if factory is not None else [])
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=callbacks, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=RepeatedBatch(batch, steps))
    return timer.times


def measure(rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """``{name: [median kept step time of round r, ...]}``, rounds interleaved, order rotated per round."""
    batch = make_batch()
    names = list(CONFIGS)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            per_round[name].append(statistics.median(fit_chunk(name, batch, warmup + steps)[warmup:]))
    return per_round


def _ratio_cell(num: list[float], den: list[float]) -> tuple[float, str]:
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    med = statistics.median(ratios)
    return med, f"{med:.2f} ({min(ratios):.2f}–{max(ratios):.2f})"


def table(per_round: dict[str, list[float]], title: str) -> str:
    lines = [f"### {title}", "",
             "| step | median ms | × plain (min–max) | × hand-written (min–max) | target | met |",
             "|---|---:|---:|---:|---:|:---:|"]
    for name, times in per_round.items():
        ms = statistics.median(times) * 1e3
        _, vs_plain = _ratio_cell(times, per_round["plain"])
        vs_hand, target, met = "", "", ""
        if name in HAND:
            med, vs_hand = _ratio_cell(times, per_round[HAND[name]])
            target, met = f"≤ {TARGET:.2f}×", "yes" if med <= TARGET else "**no**"
        lines.append(f"| {name} | {ms:.1f} | {vs_plain} | {vs_hand} | {target} | {met} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------ what the snippet perturbs


def _encoder_inputs(module: TokenClassifier, run: Callable[[], object]) -> list[Tensor]:
    """The encoder's input at each pass of ``run()`` (embedding + positions + whatever δ was added)."""
    seen: list[Tensor] = []
    handle = module.encoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    try:
        run()
    finally:
        handle.remove()
    return seen


def callback_delta(module: TokenClassifier, batch: dict) -> Tensor:
    """δ of ``AdversarialTraining(target="embed")``: adversarial − clean encoder input, one step."""
    cb = AdversarialTraining(EPS, steps=1, adversarial_weight=WEIGHT, target="embed")
    clean, adv = _encoder_inputs(module, lambda: penalized_loss(module, module.loss, batch, [cb]))
    return adv - clean


def snippet_delta(module: TokenClassifier, batch: dict) -> Tensor:
    """δ of the popular snippet: the encoder input with the attacked weight − the clean one."""
    w = module.embed.weight
    w.grad = None
    module.loss(batch).backward()
    g = w.grad
    (clean,) = _encoder_inputs(module, lambda: module.loss(batch))
    backup = w.data.clone()
    w.data.add_(EPS * g / g.norm())
    (adv,) = _encoder_inputs(module, lambda: module.loss(batch))
    w.data = backup
    w.grad = None
    return adv - clean


def _seq_norms(delta: Tensor, mask: Tensor) -> Tensor:
    return (delta * mask.unsqueeze(-1)).flatten(1).norm(dim=1)


def _same_token_pairs(batch: dict, limit: int = 4000) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices (i, j) of distinct real positions holding the same token; and whether i, j share a row."""
    ids = batch["input_ids"].flatten()
    real = batch["attention_mask"].flatten().bool()
    idx = torch.nonzero(real).flatten()
    tok = ids[idx]
    same = (tok[:, None] == tok[None, :]).triu(1)
    a, b = torch.nonzero(same, as_tuple=True)
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(a.numel(), generator=gen)[:limit]
    i, j = idx[a[pick]], idx[b[pick]]
    return i, j, (i // T) == (j // T)


def perturbation_stats() -> str:
    """What differs between the callback's δ and the snippet's, measured on this model and batches."""
    torch.manual_seed(0)
    module = TokenClassifier()
    batch = make_batch()
    mask = batch["attention_mask"]
    ours, snip = callback_delta(module, batch), snippet_delta(module, batch)
    n_ours, n_snip = _seq_norms(ours, mask) / EPS, _seq_norms(snip, mask) / EPS
    pad = ~mask.bool()
    lines = ["### What the popular FGM snippet perturbs, against `AdversarialTraining(target=\"embed\")`", "",
             f"ε = {EPS}, B = {B}, T = {T}, Zipf token ids, {int(mask.sum())} real positions of {B * T}.", ""]
    q = lambda t: (f"min {t.min():.3f}, median {t.median():.3f}, max {t.max():.3f}, "  # noqa: E731
                   f"max/min {t.max() / t.min():.1f}")
    lines += [f"- per-sequence ‖δᵢ‖/ε, callback: {q(n_ours)}; at padded positions max |δ| = "
              f"{ours[pad].abs().max():.1e}",
              f"- per-sequence ‖δᵢ‖/ε, snippet:  {q(n_snip)}; ‖δ‖ over the whole batch / ε = "
              f"{snip.norm() / EPS:.3f}"]
    # The same sequence (row 0) in other batches: the snippet's ‖δ₀‖ depends on its batch-mates.
    own0, snip0 = [float(n_ours[0])], [float(n_snip[0])]
    for seed in range(1, 6):
        other = make_batch(seed=seed)
        for key in batch:
            other[key][0] = batch[key][0]
        own0.append(float(_seq_norms(callback_delta(module, other), other["attention_mask"])[0] / EPS))
        snip0.append(float(_seq_norms(snippet_delta(module, other), other["attention_mask"])[0] / EPS))
    lines.append(f"- one sequence in 6 different batches of {B}: ‖δ₀‖/ε callback {min(own0):.3f}–{max(own0):.3f}, "
                 f"snippet {min(snip0):.3f}–{max(snip0):.3f}")
    sizes = []
    for b in (8, 64, 256):
        bb = make_batch(b, seed=10 + b)
        sizes.append(f"B={b}: {_seq_norms(snippet_delta(module, bb), bb['attention_mask']).median() / EPS:.3f}")
    lines.append(f"- snippet, median per-sequence ‖δᵢ‖/ε by batch size: {', '.join(sizes)} (callback: 1 at any B)")
    # Repeated tokens: the snippet moves every occurrence of a token by the same vector.
    i, j, same_row = _same_token_pairs(batch)
    for label, delta in (("callback", ours), ("snippet", snip)):
        flat = delta.reshape(B * T, D)
        di, dj = flat[i], flat[j]
        identical = torch.isclose(di, dj, rtol=1e-4, atol=1e-5 * float(flat.abs().max())).all(dim=1).float()
        cos = F.cosine_similarity(di, dj, dim=1)
        lines.append(f"- {label}: same-token position pairs with identical δ (to float rounding): within a sequence "
                     f"{identical[same_row].mean():.0%}, across sequences {identical[~same_row].mean():.0%} "
                     f"(mean cosine {cos.mean():.2f}; {i.numel()} sampled pairs)")
    w_rows = (module.embed.weight.grad is None)  # snippet_delta leaves no grad behind
    module.loss(batch).backward()
    touched = int(module.embed.weight.grad.abs().sum(1).gt(0).sum())
    module.embed.weight.grad = None
    distinct = int(batch["input_ids"][mask.bool()].unique().numel())
    lines.append(f"- snippet: weight rows moved {touched} of {VOCAB} (the {distinct} distinct tokens of the batch; "
                 f"padding row frozen){'' if w_rows else ' [grad was left set]'}; callback: all "
                 f"{int(mask.sum())} real positions, each its own vector")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (noisier)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=None, help="override the number of rounds")
    parser.add_argument("--steps", type=int, default=None, help="override the kept steps per fit")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps, warmup = (2, 3, 1) if args.quick else (6, 8, 2)
    rounds, steps = args.rounds or rounds, args.steps or steps
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", module="torch.nn.modules.transformer")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    per_round = measure(rounds, steps, warmup)
    title = (f"CPU ({torch.get_num_threads()} threads): transformer classifier over token ids, B={B}, T={T}, "
             f"{rounds} interleaved rounds × {steps} kept steps; ratios: median of per-round ratios (min–max)")
    out = table(per_round, title) + "\n\n" + perturbation_stats()
    print(out)
    return out


if __name__ == "__main__":
    main()
