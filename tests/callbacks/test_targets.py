"""``target=``/``mask_key=`` callbacks (and Flooding) against hand-written loops, float64.

Every reference below is plain torch + ``torch.autograd.grad``: it perturbs a layer's output by computing the
layer itself and adding δ (masked at padded positions), never through lightning_gp. Models: an MLP with a
hidden layer as the target (tuple batch of floats), and ``nn.Embedding → nn.TransformerEncoder`` with the
embedding as the target (dict batch with padding). ``tests/callbacks/test_targets_hf.py`` does the same for a Hugging
Face BERT and under DDP; it reuses the machinery here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.callbacks import (
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    DataGradientPenalty,
    GradAlign,
    ParameterGradientPenalty,
    VirtualAdversarialTraining,
)
from lightning_gp.functional._rng import seeded_generator

STEPS, BATCH, LR = 3, 6, 0.5
VOCAB, LENGTH, CLASSES = 30, 8, 3
VAT_ORDER = 4  # VirtualAdversarialTraining's place in the chain: part of its documented generator seed


# ---- problems: a model, its data, and the hand-written split "target output → logits" -------------------

@dataclass
class Parts:
    """One batch seen by the reference: ``pre()`` recomputes the target's output (with its graph), ``post``
    maps a (perturbed) target output to logits, ``mask`` is (B, T) or None."""

    pre: Callable[[], torch.Tensor]
    post: Callable[[torch.Tensor], torch.Tensor]
    mask: torch.Tensor | None
    labels: torch.Tensor

    def masked(self, delta: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return delta
        return delta * self.mask.to(delta.dtype).reshape(*self.mask.shape, *([1] * (delta.ndim - 2)))

    def logits(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        z = self.pre()
        return self.post(z if delta is None else z + self.masked(delta))

    def loss(self, delta: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(self.logits(delta), self.labels)

    def zeros(self) -> torch.Tensor:
        with torch.no_grad():
            return torch.zeros_like(self.pre()).requires_grad_(True)


@dataclass
class Problem:
    make: Callable[[torch.dtype], pl.LightningModule]
    data: Callable[[int], Any]  # n samples -> dataset
    batch: Callable[[Any, torch.Tensor], Any]  # dataset, indices -> collated batch
    parts: Callable[[pl.LightningModule, Any], Parts]
    target: str
    logits_fn: Callable | None
    table: str  # a parameter upstream of the target that must train


def seeded_(module: nn.Module, seed: int, scale: float) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return module


class SGDModule(pl.LightningModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


# -- an MLP, target = the hidden Linear "net.2" ------------------------------------------------------------

class MLP(SGDModule):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.net = seeded_(nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                                         nn.Linear(8, CLASSES)).to(dtype), 2, 0.6)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


def mlp_data(n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 5, generator=gen, dtype=torch.float64),
                         torch.randint(0, CLASSES, (n,), generator=gen))


def mlp_parts(module: MLP, batch) -> Parts:
    x, y = batch
    net = module.net
    return Parts(pre=lambda: net[2](net[1](net[0](x))), post=lambda z: net[4](net[3](z)), mask=None, labels=y)


MLP_PROBLEM = Problem(make=MLP, data=mlp_data, batch=lambda ds, idx: (ds.tensors[0][idx], ds.tensors[1][idx]),
                      parts=mlp_parts, target="net.2", logits_fn=None, table="net.0.weight")


# -- nn.Embedding → nn.TransformerEncoder, target = the embedding ------------------------------------------

def token_data(n: int, seed: int = 3) -> list[dict[str, torch.Tensor]]:
    """Dict samples with padding (id 0, mask 0) after a random length in [3, LENGTH]; every 2nd one padded."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = LENGTH if i % 2 else int(torch.randint(3, LENGTH, (), generator=gen))
        ids = torch.randint(1, VOCAB, (LENGTH,), generator=gen)
        mask = (torch.arange(LENGTH) < length).long()
        samples.append({"input_ids": ids * mask, "attention_mask": mask,
                        "labels": torch.randint(0, CLASSES, (), generator=gen)})
    return samples


def collate(samples: list[dict], idx) -> dict[str, torch.Tensor]:
    return torch.utils.data.default_collate([samples[int(i)] for i in idx])


class TokenTransformer(SGDModule):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the global seed (and the callbacks' draws) stay the test's
            torch.manual_seed(4)
            self.emb = nn.Embedding(VOCAB, 16)
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, CLASSES)
        self.to(dtype)
        with torch.no_grad():
            self.emb.weight.mul_(0.5)

    def body(self, z, mask):
        # The math kernel of SDPA: the CPU flash kernel has no double backward (double backpropagation).
        with sdpa_kernel(SDPBackend.MATH):
            h = self.encoder(z, src_key_padding_mask=mask == 0)
        m = mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))

    def logits(self, batch):
        return self.body(self.emb(batch["input_ids"]), batch["attention_mask"])

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.logits(batch), batch["labels"])


def token_parts(module: TokenTransformer, batch) -> Parts:
    mask = batch["attention_mask"]
    return Parts(pre=lambda: module.emb(batch["input_ids"]), post=lambda z: module.body(z, mask), mask=mask,
                 labels=batch["labels"])


TOKEN_PROBLEM = Problem(make=TokenTransformer, data=token_data, batch=collate, parts=token_parts, target="emb",
                        logits_fn=lambda module, batch: module.logits(batch), table="emb.weight")


# ---- Lightning and the reference loop ---------------------------------------------------------------------

def fit(problem: Problem, callbacks, *, steps: int = STEPS, batch_size: int = BATCH, module=None,
        precision: str = "64-true", n: int | None = None, **kwargs) -> tuple[pl.Trainer, pl.LightningModule]:
    module = problem.make(torch.float64) if module is None else module
    trainer = pl.Trainer(max_steps=steps, precision=precision, callbacks=callbacks, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         **kwargs)
    data = problem.data(n or steps * batch_size)
    trainer.fit(module, DataLoader(data, batch_size=batch_size))
    return trainer, module


def reference(problem: Problem, objective, *, steps: int = STEPS, batch_size: int = BATCH, micro: int = 1,
              module=None) -> pl.LightningModule:
    """SGD on ``objective(parts, step, micro_index)`` (a tensor, or a list of parameter gradients);
    ``micro`` micro-batches of ``batch_size`` per step, each objective divided by ``micro`` as Lightning does."""
    module = problem.make(torch.float64) if module is None else module
    params = list(module.parameters())
    data = problem.data(steps * micro * batch_size)
    for t in range(steps):
        total = [torch.zeros_like(p) for p in params]
        for m in range(micro):
            i = t * micro + m
            parts = problem.parts(module, problem.batch(data, torch.arange(i * batch_size, (i + 1) * batch_size)))
            out = objective(parts, t, m)
            grads = grad_list(out, params) if isinstance(out, torch.Tensor) else out
            for acc, g in zip(total, grads, strict=True):
                acc += g / micro
        with torch.no_grad():
            for p, g in zip(params, total, strict=True):
                p -= LR * g
    return module


def grad_list(out: torch.Tensor, params, **kwargs) -> list[torch.Tensor]:
    grads = torch.autograd.grad(out, params, allow_unused=True, **kwargs)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def assert_same_training(got: nn.Module, expected: nn.Module, problem: Problem, atol: float) -> None:
    initial = problem.make(torch.float64).state_dict()
    want = expected.state_dict()
    for key, value in got.state_dict().items():
        torch.testing.assert_close(value, want[key], atol=atol, rtol=0, msg=key)
    assert max((v - initial[k]).abs().max() for k, v in want.items()) > 1e-3  # it trained
    assert (want[problem.table] - initial[problem.table]).abs().max() > 1e-4  # the layers before the target too


# ---- hand-written math -----------------------------------------------------------------------------------

def sample_norm(t: torch.Tensor) -> torch.Tensor:
    """‖tᵢ‖ over all non-batch dims, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def unit(g: torch.Tensor) -> torch.Tensor:
    n = sample_norm(g)
    return g / torch.where(n > 0, n, torch.ones_like(n))


def project(d: torch.Tensor, eps: float) -> torch.Tensor:
    n = sample_norm(d)
    return d * torch.where(n > eps, eps / torch.where(n > 0, n, torch.ones_like(n)), torch.ones_like(n))


def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p = F.log_softmax(p_logits, -1)
    return (p.exp() * (p - F.log_softmax(q_logits, -1))).sum(-1).mean()


def ref_fgm(eps: float, a: float):
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        d0 = P.zeros()
        clean = P.loss(d0)
        (g,) = torch.autograd.grad(clean, d0, retain_graph=True)
        adv = P.loss(eps * unit(g))
        return adv if a == 1 else (1 - a) * clean + a * adv
    return objective


def ref_fgm_relative(eps: float, a: float):
    """FGM with ε relative to each sample's norm of the target output over its real positions: ε‖zᵢ‖·gᵢ/‖gᵢ‖."""
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        d0 = P.zeros()
        clean = P.loss(d0)
        (g,) = torch.autograd.grad(clean, d0, retain_graph=True)
        with torch.no_grad():
            norms = sample_norm(P.masked(P.pre()))
        adv = P.loss(eps * norms * unit(g))
        return adv if a == 1 else (1 - a) * clean + a * adv
    return objective


def ref_pgd(eps: float, k: int):
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        delta = P.zeros()
        for _ in range(k):
            (g,) = torch.autograd.grad(P.loss(delta), delta)
            delta = project(delta.detach() + 2.5 * eps / k * unit(g), eps).requires_grad_(True)
        return P.loss(delta.detach())
    return objective


def ref_freelb(eps: float, k: int):
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        delta, losses = P.zeros(), []
        for i in range(k):
            loss = P.loss(delta)
            losses.append(loss)
            if i < k - 1:
                (g,) = torch.autograd.grad(loss, delta, retain_graph=True)
                delta = project(delta.detach() + 2.5 * eps / k * unit(g), eps).requires_grad_(True)
        return sum(losses) / k
    return objective


def vat_generator(step: int, micro: int = 0, rank: int = 0, initial_seed: int | None = None) -> torch.Generator:
    """The documented seed of the callback's generator: (initial seed, rank, global step, micro-batch, order)."""
    seed = torch.initial_seed() if initial_seed is None else initial_seed
    return seeded_generator("cpu", seed, rank, step, micro, VAT_ORDER)


def ref_vat(eps: float, weight: float, *, xi: float = 1e-6, iterations: int = 1, rank: int = 0,
            initial_seed: int | None = None):
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        loss = P.loss()
        with torch.no_grad():
            p_logits = P.logits()
            shape = P.pre().shape
        gen = vat_generator(t, m, rank, initial_seed)
        d = unit(P.masked(torch.randn(shape, generator=gen, dtype=torch.float64)))
        for _ in range(iterations):
            r = (xi * d).requires_grad_(True)
            (g,) = torch.autograd.grad(kl(p_logits, P.logits(r)), r)
            d = unit(P.masked(g))
        return loss + weight * kl(p_logits, P.logits(eps * d))
    return objective


TRADES_ORDER = 6  # TRADES's place in the chain: part of its documented generator seed


def ref_trades(eps: float, beta: float, steps: int, return_parts: bool = False):
    """TRADES on a layer's output: δ from 0.001·N(0, I), l∞ sign steps of ε/4 on KL(f ‖ f(·+δ)) (a sum, as the
    authors' KLDivLoss), projected; then CE + β·KL_sum/B with the clean logits not detached. ``return_parts``: the
    loss as a function of the current weights, δ fixed (for AWP)."""
    def objective(P: Parts, t: int, m: int):
        gen = seeded_generator("cpu", torch.initial_seed(), 0, t, m, TRADES_ORDER)
        with torch.no_grad():
            clean = P.logits()
            shape = P.pre().shape
        delta = 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)
        for _ in range(steps):
            delta.requires_grad_(True)
            kl_sum = F.kl_div(F.log_softmax(P.logits(delta), 1), F.softmax(clean, 1), reduction="sum")
            (g,) = torch.autograd.grad(kl_sum, delta)
            delta = (delta.detach() + eps / 4 * g.sign()).clamp(-eps, eps)
        def loss_at() -> torch.Tensor:
            adv = P.logits(delta)
            robust = F.kl_div(F.log_softmax(adv, 1), F.softmax(P.logits(), 1), reduction="sum") / len(P.labels)
            return P.loss() + beta * robust
        return loss_at if return_parts else loss_at()
    return objective


def ref_trades_awp(eps: float, beta: float, steps: int, gamma: float, module: nn.Module):
    """TRADES on a layer's output with AWP: δ found at W; d = ∇ of TRADES's loss at W over the weights of dimension
    > 1; W + γ‖W‖d/‖d‖ per weight for the step's gradient; W back (plain SGD: stepping at W + v and subtracting v
    after is the same as stepping at W with the gradient from W + v)."""
    inner = ref_trades(eps, beta, steps, return_parts=True)
    params = list(module.parameters())
    weights = [p for n, p in module.named_parameters() if "weight" in n and p.ndim > 1]

    def objective(P: Parts, t: int, m: int) -> list[torch.Tensor]:
        loss_at = inner(P, t, m)
        d = torch.autograd.grad(loss_at(), weights)
        moves = [gamma * w.norm() / (g.norm() + 1e-20) * g for w, g in zip(weights, d, strict=True)]
        with torch.no_grad():
            for w, v in zip(weights, moves, strict=True):
                w += v
        grads = grad_list(loss_at(), params)
        with torch.no_grad():
            for w, v in zip(weights, moves, strict=True):
                w -= v
        return grads
    return objective


GRAD_ALIGN_ORDER = -2  # GradAlign's place in the chain: part of its documented generator seed


def ref_grad_align(weight: float, eps: float):
    """GradAlign on a layer's output: the loss's gradient at δ = 0 (detached) and at δ = η ~ U[−ε, ε] (masked, with
    its graph); weight·(1 − mean cos) over the samples whose two gradients are nonzero."""
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        zero = P.zeros()
        (g1,) = torch.autograd.grad(P.loss(zero), zero)
        gen = seeded_generator("cpu", torch.initial_seed(), 0, t, m, GRAD_ALIGN_ORDER)
        eta = P.masked(torch.empty(zero.shape, dtype=torch.float64).uniform_(-eps, eps, generator=gen))
        eta.requires_grad_(True)
        (g2,) = torch.autograd.grad(P.loss(eta), eta, create_graph=True)
        used = (g1.flatten(1).norm(dim=1) != 0) & (g2.flatten(1).norm(dim=1) != 0)
        cos = F.cosine_similarity(g1.flatten(1)[used], g2.flatten(1)[used], dim=1, eps=0.0)
        return P.loss() + weight * (1 - cos.mean())
    return objective


def ref_data_penalty(weight: float):
    def objective(P: Parts, t: int, m: int) -> torch.Tensor:
        d0 = P.zeros()
        loss = P.loss(d0)
        (g,) = torch.autograd.grad(loss, d0, create_graph=True)
        g = g * len(P.labels)  # ∇ of the per-sample sum
        return loss + weight * g.flatten(1).norm(dim=1).pow(2).mean()
    return objective


def ref_data_fd(weight: float, params_of, step: float = 1e-2):
    """Two passes: ∇θ[L(x + h·d) − L(x)]/h with d = ∂‖gᵢ‖²/∂gᵢ = 2gᵢ, h relative to the RMS ‖xᵢ‖."""
    def objective(P: Parts, t: int, m: int) -> list[torch.Tensor]:
        params = params_of()
        d0 = P.zeros()
        loss = P.loss(d0)
        g, *base = grad_list(loss, [d0, *params])
        direction = 2 * g * len(P.labels)
        x = P.masked(P.pre().detach())
        h = step * float(x.flatten(1).square().sum(1).mean().sqrt()) / float(direction.flatten(1).norm(dim=1).max())
        second = grad_list(P.loss(h * direction), params)
        return [b + weight * (s - b) / h for b, s in zip(base, second, strict=True)]
    return objective


# ---- exactness -------------------------------------------------------------------------------------------

def cases(problem: Problem) -> dict[str, tuple[Callable, Callable]]:
    """name -> (callbacks, reference objective given the reference module)."""
    tgt, lf = problem.target, problem.logits_fn
    return {
        "fgm_half": (lambda: [AdversarialTraining(0.5, adversarial_weight=0.5, target=tgt)],
                     lambda mod: ref_fgm(0.5, 0.5)),
        "fgm_full": (lambda: [AdversarialTraining(0.5, target=tgt)], lambda mod: ref_fgm(0.5, 1.0)),
        "pgd3": (lambda: [AdversarialTraining(0.5, steps=3, target=tgt)], lambda mod: ref_pgd(0.5, 3)),
        "fgm_relative": (lambda: [AdversarialTraining(0.05, adversarial_weight=0.5, target=tgt, eps_relative=True)],
                         lambda mod: ref_fgm_relative(0.05, 0.5)),
        "freelb3": (lambda: [AdversarialTraining(0.5, steps=3, average_steps=True, target=tgt)],
                    lambda mod: ref_freelb(0.5, 3)),
        "vat": (lambda: [VirtualAdversarialTraining(1.0, xi=1e-3, weight=2.0, target=tgt, logits_fn=lf)],
                lambda mod: ref_vat(1.0, 2.0, xi=1e-3)),
        "vat_power2": (lambda: [VirtualAdversarialTraining(1.0, xi=1e-3, power_iterations=2, target=tgt,
                                                           logits_fn=lf)],
                       lambda mod: ref_vat(1.0, 1.0, xi=1e-3, iterations=2)),
        "trades": (lambda: [TRADES(0.5, 2.0, steps=3, bounds=None, target=tgt, logits_fn=lf)],
                   lambda mod: ref_trades(0.5, 2.0, 3)),
        "trades_awp": (lambda: [TRADES(0.5, 2.0, steps=3, bounds=None, target=tgt, logits_fn=lf),
                                AdversarialWeightPerturbation(0.02)],
                       lambda mod: ref_trades_awp(0.5, 2.0, 3, 0.02, mod)),
        "grad_align": (lambda: [GradAlign(0.5, 0.3, target=tgt, method="double_backward")],
                       lambda mod: ref_grad_align(0.5, 0.3)),
        "data_double_backward": (lambda: [DataGradientPenalty(0.05, target=tgt)], lambda mod: ref_data_penalty(0.05)),
        "data_finite_difference": (lambda: [DataGradientPenalty(0.05, target=tgt, method="finite_difference")],
                                   lambda mod: ref_data_fd(0.05, lambda: list(mod.parameters()))),
    }


def run_case(problem: Problem, name: str, atol: float) -> None:
    callbacks, objective = cases(problem)[name]
    expected = problem.make(torch.float64)
    reference(problem, objective(expected), module=expected)
    _, got = fit(problem, callbacks())
    assert_same_training(got, expected, problem, atol)


@pytest.mark.parametrize("name", list(cases(MLP_PROBLEM)))
def test_mlp_hidden_layer_matches_hand_written_loop(name):
    run_case(MLP_PROBLEM, name, 1e-9)


@pytest.mark.parametrize("name", list(cases(TOKEN_PROBLEM)))
def test_transformer_embedding_matches_hand_written_loop(name):
    run_case(TOKEN_PROBLEM, name, 1e-9)


def test_target_as_module_object():
    module = TOKEN_PROBLEM.make(torch.float64)
    _, got = fit(TOKEN_PROBLEM, [AdversarialTraining(0.5, adversarial_weight=0.5, target=module.emb)], module=module)
    assert_same_training(got, reference(TOKEN_PROBLEM, ref_fgm(0.5, 0.5)), TOKEN_PROBLEM, 1e-9)


def test_accumulate_grad_batches():
    """2 micro-batches per step: Lightning divides each objective by 2; VAT's draws follow the micro-batch."""
    for callbacks, objective in [
        ([AdversarialTraining(0.5, adversarial_weight=0.5, target="emb")], ref_fgm(0.5, 0.5)),
        ([VirtualAdversarialTraining(1.0, xi=1e-3, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn)],
         ref_vat(1.0, 1.0, xi=1e-3)),
    ]:
        expected = reference(TOKEN_PROBLEM, objective, batch_size=3, micro=2)
        _, got = fit(TOKEN_PROBLEM, callbacks, batch_size=3, n=STEPS * 6, accumulate_grad_batches=2)
        assert_same_training(got, expected, TOKEN_PROBLEM, 1e-9)


def test_composed_with_parameter_gradient_penalty():
    """FGM (a = 1) outermost, then ‖∇θL‖² of the adversarial loss (θ includes the embedding table)."""
    expected = TOKEN_PROBLEM.make(torch.float64)
    fgm = ref_fgm(0.5, 1.0)

    def objective(P, t, m):
        adv = fgm(P, t, m)
        g = torch.autograd.grad(adv, list(expected.parameters()), create_graph=True)
        return adv + 0.1 * sum(x.square().sum() for x in g)

    reference(TOKEN_PROBLEM, objective, module=expected)
    _, got = fit(TOKEN_PROBLEM, [ParameterGradientPenalty(0.1), AdversarialTraining(0.5, target="emb")])
    assert_same_training(got, expected, TOKEN_PROBLEM, 1e-9)


def fgm_then(inner):
    """FGM (a = 1) outermost on the target, then ``inner``'s objective on the adversarial point: every pass
    of the inner callback sees x + δ_adv (as it sees the adversarial batch on a batch input)."""
    def objective(P: Parts, t: int, m: int):
        d0 = P.zeros()
        (g,) = torch.autograd.grad(P.loss(d0), d0)
        delta = 0.5 * unit(g)
        moved = Parts(pre=lambda: P.pre() + P.masked(delta), post=P.post, mask=P.mask, labels=P.labels)
        return inner(moved, t, m)
    return objective


@pytest.mark.parametrize("inner", ["vat", "data_finite_difference", "data_double_backward"])
def test_two_target_callbacks_compose(inner):
    """Two callbacks on the same target: the inner one's extra passes run inside the outer one's hook."""
    expected = TOKEN_PROBLEM.make(torch.float64)
    callback, objective = {
        "vat": (VirtualAdversarialTraining(1.0, xi=1e-3, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn),
                ref_vat(1.0, 1.0, xi=1e-3)),
        "data_finite_difference": (DataGradientPenalty(0.05, target="emb", method="finite_difference"),
                                   ref_data_fd(0.05, lambda: list(expected.parameters()))),
        "data_double_backward": (DataGradientPenalty(0.05, target="emb"), ref_data_penalty(0.05)),
    }[inner]
    reference(TOKEN_PROBLEM, fgm_then(objective), module=expected)
    _, got = fit(TOKEN_PROBLEM, [callback, AdversarialTraining(0.5, target="emb")])
    assert_same_training(got, expected, TOKEN_PROBLEM, 1e-9)


# ---- torch.compile, bf16, checkpoint resume --------------------------------------------------------------

class CompiledMLP(MLP):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__(dtype)
        self.net = torch.compile(self.net, backend="aot_eager")


def test_finite_difference_target_inside_compiled_submodule():
    torch._dynamo.reset()
    callbacks = lambda: [DataGradientPenalty(0.05, target="net.2", method="finite_difference")]  # noqa: E731
    _, eager = fit(MLP_PROBLEM, callbacks())
    _, compiled = fit(MLP_PROBLEM, callbacks(), module=CompiledMLP())
    got = {k.replace("_orig_mod.", ""): v for k, v in compiled.state_dict().items()}
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    assert (eager.net[0].weight - MLP().net[0].weight).abs().max() > 1e-3


@pytest.mark.parametrize("callbacks", [
    lambda: [AdversarialTraining(0.5, adversarial_weight=0.5, target="emb")],
    lambda: [AdversarialTraining(0.5, steps=2, average_steps=True, random_start=True, target="emb")],
    lambda: [VirtualAdversarialTraining(1.0, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn)],
    lambda: [DataGradientPenalty(0.05, target="emb", method="finite_difference")],
    lambda: [TRADES(0.5, steps=2, bounds=None, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn)],
    lambda: [GradAlign(0.5, 0.3, target="emb")],
], ids=["fgm", "freelb_random_start", "vat", "data_fd", "trades", "grad_align"])
def test_bf16_mixed(callbacks):
    module = TOKEN_PROBLEM.make(torch.float32)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer, module = fit(TOKEN_PROBLEM, callbacks(), module=module, precision="bf16-mixed", steps=2)
    assert trainer.global_step == 2
    assert all(torch.isfinite(v).all() for v in module.state_dict().values())
    assert all(math.isfinite(float(v)) for v in trainer.callback_metrics.values())
    assert (module.emb.weight - before["emb.weight"]).abs().max() > 0
    assert (module.head.weight - before["head.weight"]).abs().max() > 0


@pytest.mark.parametrize("callbacks", [
    lambda: [AdversarialTraining(0.5, steps=2, random_start=True, target="emb")],
    lambda: [AdversarialTraining(0.5, norm="linf", random_start=True, adversarial_weight=0.5, target="emb")],
    lambda: [VirtualAdversarialTraining(1.0, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn)],
    lambda: [AdversarialTraining(0.5, target="emb"), ParameterGradientPenalty(0.1),
             DataGradientPenalty(0.05, target="emb", method="finite_difference")],
    lambda: [TRADES(0.5, steps=2, bounds=None, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn)],
    lambda: [GradAlign(0.5, 0.3, target="emb"), AdversarialTraining(0.3, norm="linf", target="emb")],
], ids=["pgd_random_start", "fgsm_linf_random_start", "vat", "composed", "trades", "fgsm_grad_align"])
def test_checkpoint_resume_is_bit_identical(callbacks, tmp_path):
    """2 epochs of 2 steps straight == 1 epoch, save, resume to 2 epochs: parameters bit-identical.

    (Epochs, not ``max_steps``: a checkpoint saved after a ``max_steps`` stop mid-way through Lightning's
    epoch bookkeeping makes Lightning itself replay a batch on resume, with or without these callbacks.)
    """
    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(max_epochs=epochs, precision="64-true", callbacks=callbacks(), logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)

    def loader() -> DataLoader:
        return DataLoader(TOKEN_PROBLEM.data(2 * BATCH), batch_size=BATCH)

    straight = TOKEN_PROBLEM.make(torch.float64)
    trainer(2).fit(straight, loader())
    first = trainer(1)
    first.fit(TOKEN_PROBLEM.make(torch.float64), loader())
    ckpt = tmp_path / "half.ckpt"
    first.save_checkpoint(ckpt)
    resumed = TOKEN_PROBLEM.make(torch.float64)
    second = trainer(2)
    second.fit(resumed, loader(), ckpt_path=ckpt)
    assert second.global_step == 4
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    assert not torch.equal(straight.emb.weight, TOKEN_PROBLEM.make(torch.float64).emb.weight)
    # the draws matter: another seed trains differently (so bit-identity is not vacuous)
    if any(getattr(c, "random_start", False) or isinstance(c, (VirtualAdversarialTraining, TRADES, GradAlign))
           for c in callbacks()):
        torch.manual_seed(1)
        other = TOKEN_PROBLEM.make(torch.float64)
        trainer(2).fit(other, loader())
        assert not torch.equal(other.emb.weight, straight.emb.weight)


# ---- Flooding --------------------------------------------------------------------------------------------


# ---- errors ----------------------------------------------------------------------------------------------

class ToIds(nn.Module):
    """Bucketizes a float feature into token ids: an integer output."""

    def forward(self, x):
        return (x.sigmoid() * (VOCAB - 1)).long()


class BucketModel(SGDModule):
    def __init__(self) -> None:
        super().__init__()
        self.tok, self.emb, self.head = ToIds(), nn.Embedding(VOCAB, 4), nn.Linear(4, CLASSES)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.emb(self.tok(x)).mean(1)), y)


class IdsModel(SGDModule):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict({"tokens": nn.Embedding(VOCAB, 4)})
        self.head = nn.Linear(4, CLASSES)

    def forward(self, ids):
        return self.head(self.encoder["tokens"](ids).mean(1))

    def training_step(self, batch, batch_idx):
        ids, y = batch
        return F.cross_entropy(self(ids), y)


def quick_fit(module, callbacks, data) -> None:
    trainer = pl.Trainer(max_steps=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data, batch_size=4))


def ids_data():
    return TensorDataset(torch.randint(0, VOCAB, (8, 5)), torch.randint(0, CLASSES, (8,)))


def test_missing_target_lists_nearest_names():
    with pytest.raises(ValueError, match=r"target='encoder\.token'.*Nearest module names: \['encoder\.tokens'"):
        quick_fit(IdsModel(), [AdversarialTraining(0.1, target="encoder.token")], ids_data())


def test_missing_target_raised_at_setup():
    """The path is resolved in setup, before any training step runs."""
    module = IdsModel()
    calls = []
    module.training_step = lambda *a: calls.append(1)
    with pytest.raises(ValueError, match="Nearest module names"):
        quick_fit(module, [DataGradientPenalty(0.1, target="encodr")], ids_data())
    assert not calls


@pytest.mark.parametrize("callback", [
    lambda: AdversarialTraining(0.1, target="tok"),
    lambda: DataGradientPenalty(0.1, target="tok"),
    lambda: VirtualAdversarialTraining(0.1, target="tok", logits_fn=lambda m, b: m.head(m.emb(m.tok(b[0])).mean(1))),
])
def test_integer_target_output(callback):
    data = TensorDataset(torch.randn(8, 5), torch.randint(0, CLASSES, (8,)))
    with pytest.raises(TypeError, match=r"`ToIds` returns torch\.int64.*floating-point"):
        quick_fit(BucketModel(), [callback()], data)


def test_integer_input_without_target_names_embeddings():
    with pytest.raises(TypeError, match=r"target=.*nn\.Embedding modules in the model: \['encoder\.tokens'\]"):
        quick_fit(IdsModel(), [DataGradientPenalty(0.1)], ids_data())
    with pytest.raises(TypeError, match=r"target=.*\['encoder\.tokens'\]"):
        quick_fit(IdsModel(), [AdversarialTraining(0.1)], ids_data())
    with pytest.raises(TypeError, match=r"target=.*\['encoder\.tokens'\]"):
        quick_fit(IdsModel(), [VirtualAdversarialTraining(0.1)], ids_data())


class BadMaskData(torch.utils.data.Dataset):
    def __init__(self, mask_len: int | None) -> None:
        self.samples = token_data(8)
        self.mask_len = mask_len

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = dict(self.samples[i])
        s["attention_mask"] = s["attention_mask"][0] if self.mask_len is None else torch.ones(self.mask_len).long()
        s["pad"] = s["attention_mask"]
        return s


class MaskFree(TokenTransformer):
    def logits(self, batch):
        return self.body(self.emb(batch["input_ids"]), torch.ones_like(batch["input_ids"]))


@pytest.mark.parametrize("callback", [
    lambda key: AdversarialTraining(0.1, target="emb", mask_key=key),
    lambda key: DataGradientPenalty(0.1, target="emb", mask_key=key),
    lambda key: VirtualAdversarialTraining(0.1, target="emb", mask_key=key, logits_fn=TOKEN_PROBLEM.logits_fn),
])
def test_mask_of_wrong_shape(callback):
    # (B, T + 1) for a (B, T, H) output: the shape is checked against the target's output
    with pytest.raises(ValueError, match=r"must have shape \(B, T\) = \(4, 8\).*got shape \(4, 9\)"):
        quick_fit(MaskFree(), [callback(None)], BadMaskData(LENGTH + 1))
    with pytest.raises(ValueError, match=r"must have shape \(B, T\) = \(4, 8\).*got shape \(4, 9\)"):
        quick_fit(MaskFree(), [callback("pad")], BadMaskData(LENGTH + 1))
    # (B,): not a (B, T) mask at all
    with pytest.raises(ValueError, match=r"`batch\['attention_mask'\]` must be a \(B, T\) tensor.*\(4,\)"):
        quick_fit(MaskFree(), [callback(None)], BadMaskData(None))
    with pytest.raises(ValueError, match=r"`mask_key='absent'` is not a key of the batch"):
        quick_fit(MaskFree(), [callback("absent")], BadMaskData(LENGTH))


def test_probe_hook_is_removed_after_each_step():
    """No forward hook stays on the target between steps (it exists only during a pass)."""
    module = TOKEN_PROBLEM.make(torch.float64)
    fit(TOKEN_PROBLEM, [AdversarialTraining(0.5, steps=2, target="emb"),
                        VirtualAdversarialTraining(1.0, target="emb", logits_fn=TOKEN_PROBLEM.logits_fn),
                        DataGradientPenalty(0.05, target="emb")], module=module, steps=1)
    assert not module.emb._forward_hooks
