"""The models people bring: tiny Hugging Face model classes (local configs, SDPA attention by default).

- Every input-space callback, the parameter penalty, SAM and flooding on every model of ``tests/hf_zoo.py``, with SDPA
  and with eager attention and dropout: it trains (finite, moved parameters) or refuses with a message that
  names the layer and the fix. The parameter penalty, SAM, ASAM and flooding equal hand-written loops on every model.
- Per-sample norms (functional and both monitor modes) on every model against a loop over samples, with B = 4
  and B = T.
- Exactness on nine models (classifiers, causal LMs at their last position, seq2seq, ViT on its pixels): each
  callback equals the hand-written loops of ``tests/callbacks/test_targets.py`` on the same kernels, so the
  callbacks' default
  ``method="auto"`` on SDPA (no double backward) is held against a hand-written finite-difference loop, and the
  double backward against an eager-attention loop.
- Parameter perturbations leave tied, aliased and resized models as they were: the same parameter objects,
  the same ties, the same ``requires_grad``; and the finite difference agrees with the double backward.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_gp import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    GradientNormMonitor,
    ParameterGradientPenalty,
    SharpnessAwareMinimization,
    VirtualAdversarialTraining,
    penalized_loss,
)
from lightning_gp.functional import per_sample_grad_norms
from tests.callbacks.test_targets import (
    Parts,
    Problem,
    SGDModule,
    collate,
    fit,
    ref_data_fd,
    ref_data_penalty,
    ref_fgm,
    ref_freelb,
    ref_pgd,
    ref_vat,
    reference,
    token_data,
)
from tests.hf_zoo import ZOO, HFModule, batch, loader, per_sample_loss

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
RUNS_TWICE = r"\(registered as `model.shared`, `model.encoder.embed_tokens`.*\) runs more than once in one forward pass"


def methods(target: str) -> dict:
    lf = lambda module, batch: module.logits(batch)  # noqa: E731
    return {
        "fgm": lambda: [AdversarialTraining(0.1, target=target)],
        "pgd": lambda: [AdversarialTraining(0.1, steps=2, target=target)],
        "freelb": lambda: [AdversarialTraining(0.1, steps=2, average_steps=True, target=target)],
        "vat": lambda: [VirtualAdversarialTraining(0.1, target=target, logits_fn=lf)],
        "data_auto": lambda: [DataGradientPenalty(0.1, target=target)],
        "data_fd": lambda: [DataGradientPenalty(0.1, target=target, method="finite_difference")],
        "param_auto": lambda: [ParameterGradientPenalty(0.1)],
        "param_fd": lambda: [ParameterGradientPenalty(0.1, method="finite_difference")],
        "flooding": lambda: [Flooding(10.0)],
        "sam": lambda: [SharpnessAwareMinimization(0.05)],
    }


INPUT_SPACE = {"fgm", "pgd", "freelb", "vat", "data_auto", "data_fd"}
CELLS = [(m, c) for m in ZOO for c in methods("")]


@pytest.mark.parametrize(("attn", "dropout"), [("sdpa", 0.0), ("eager", 0.1)], ids=["sdpa", "eager-dropout"])
@pytest.mark.parametrize(("model", "method"), CELLS, ids=[f"{m}-{c}" for m, c in CELLS])
def test_every_model_trains_or_refuses_clearly(model, method, attn, dropout):
    zoo = ZOO[model]
    module = HFModule(zoo, attn=attn, dropout=dropout)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = pl.Trainer(max_steps=1, callbacks=methods(zoo.embeddings)[method](), **QUIET)
    if model == "t5_resized" and method in INPUT_SPACE:
        # `shared` runs in the encoder and in the decoder: one rule for every callback, a refusal that names it
        with pytest.raises(RuntimeError, match=RUNS_TWICE):
            trainer.fit(module, loader(zoo))
        return
    trainer.fit(module, loader(zoo))
    moved = [n for n, p in module.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(torch.isfinite(p).all() for p in module.parameters())
    if method in INPUT_SPACE:  # the embedding table upstream of the target trains
        table = module.get_submodule(zoo.embeddings)
        assert any(n.startswith(zoo.embeddings) for n in moved) or table.weight is not None


def test_a_tied_module_that_does_not_run_names_the_ones_that_do():
    zoo = ZOO["bart"]
    trainer = pl.Trainer(max_steps=1, callbacks=[AdversarialTraining(0.1, target="model.model.shared")], **QUIET)
    with pytest.raises(RuntimeError, match=r"did not run.*share its weight: .*`model.model.encoder.embed_tokens`"):
        trainer.fit(HFModule(zoo), loader(zoo))


# ---- exactness on the classification models -----------------------------------------------------------------

class ZooClassifier(SGDModule):
    """A zoo model as a classifier on ``tests/callbacks/test_targets.py``'s token data: its (B, C) logits, or an LM's
    logits at the last position; ``attn`` picks its attention kernel."""

    def __init__(self, name: str, dtype: torch.dtype = torch.float64, attn: str = "sdpa") -> None:
        super().__init__()
        self.kind = ZOO[name].kind
        with torch.random.fork_rng():
            torch.manual_seed(5)
            self.model = ZOO[name].build(attn, 0.0)
        self.to(dtype)

    def extra(self, batch) -> dict:
        """A seq2seq model's decoder input: fixed ids made from the batch (the same in every pass)."""
        return {"decoder_input_ids": batch["input_ids"][:, :3].flip(1)} if self.kind == "s2s" else {}

    def head(self, out) -> torch.Tensor:
        logits = out.logits
        return logits if logits.ndim == 2 else logits[:, -1]

    def logits(self, batch):
        if self.kind == "vit":
            return self.head(self.model(pixel_values=batch["pixel_values"]))
        return self.head(self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    **self.extra(batch)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.logits(batch), batch["labels"])


def unpadded_token_data(n: int) -> list[dict]:
    """``token_data`` without padding: GPT-2's classifier pools the last non-pad token of its ids, which the
    ``inputs_embeds`` path of the reference cannot see."""
    return [dict(s, input_ids=s["input_ids"].clamp_min(1), attention_mask=torch.ones_like(s["attention_mask"]))
            for s in token_data(n)]


def pixel_data(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"pixel_values": torch.randn(3, 8, 8, generator=g, dtype=torch.float64),
             "labels": torch.randint(0, 3, (), generator=g)} for _ in range(n)]


def problem(name: str) -> Problem:
    if ZOO[name].kind == "vit":  # the pixels themselves: the batch input, no layer target
        def pixel_parts(module: ZooClassifier, batch) -> Parts:
            return Parts(pre=lambda: batch["pixel_values"], post=lambda z: module.head(module.model(pixel_values=z)),
                         mask=None, labels=batch["labels"])

        return Problem(make=lambda dtype: ZooClassifier(name, dtype), data=pixel_data, batch=collate,
                       parts=pixel_parts, target=None, logits_fn=lambda module, batch: module.logits(batch),
                       table="model.vit.embeddings.patch_embeddings.projection.weight")
    target = ZOO[name].embeddings

    def parts(module: ZooClassifier, batch) -> Parts:
        ids, mask, model = batch["input_ids"], batch["attention_mask"], module.model
        return Parts(pre=lambda: module.get_submodule(target)(ids),
                     post=lambda z: module.head(model(inputs_embeds=z, attention_mask=mask, **module.extra(batch))),
                     mask=mask, labels=batch["labels"])

    data = unpadded_token_data if name == "gpt2_cls" else token_data
    return Problem(make=lambda dtype: ZooClassifier(name, dtype), data=data, batch=collate, parts=parts,
                   target=target, logits_fn=lambda module, batch: module.logits(batch), table=f"{target}.weight")


def exact_cases(target: str | None, reference_module: nn.Module, data_weight: float = 0.05) -> dict:
    lf = lambda module, batch: module.logits(batch)  # noqa: E731
    site = dict(target=target) if target is not None else dict(input_key="pixel_values")
    return {
        "fgm": ([AdversarialTraining(0.5, adversarial_weight=0.5, **site)], ref_fgm(0.5, 0.5)),
        "pgd3": ([AdversarialTraining(0.5, steps=3, **site)], ref_pgd(0.5, 3)),
        "freelb3": ([AdversarialTraining(0.5, steps=3, average_steps=True, **site)], ref_freelb(0.5, 3)),
        "vat": ([VirtualAdversarialTraining(1.0, xi=1e-3, weight=2.0, logits_fn=lf, **site)],
                ref_vat(1.0, 2.0, xi=1e-3)),
        # SDPA has no double backward: "auto" must take the finite difference, as a hand-written loop would
        "data_auto": ([DataGradientPenalty(data_weight, **site)],
                      ref_data_fd(data_weight, lambda: list(reference_module.parameters()))),
        "data_double_backward_eager": ([DataGradientPenalty(data_weight, method="double_backward", **site)],
                                       ref_data_penalty(data_weight)),
    }


EXACT_MODELS = ("roberta", "distilbert", "gpt2_cls", "gpt2_lm", "llama", "opt", "t5", "bart", "vit")
EXACT = [(m, c) for m in EXACT_MODELS for c in exact_cases("", nn.Module())]


@pytest.mark.parametrize(("model", "case"), EXACT, ids=[f"{m}-{c}" for m, c in EXACT])
def test_classifiers_match_hand_written_loops(model, case):
    prob = problem(model)
    attn = "eager" if case.endswith("_eager") else "sdpa"  # the double backward needs eager attention
    expected = ZooClassifier(model, attn=attn)  # the reference: plain torch on the same kernels
    # Llama's RMSNorm on 0.02-scale embeddings makes ‖∇ₓℓ‖² ≈ 1e5: a smaller weight keeps SGD from diverging
    callbacks, objective = exact_cases(prob.target, expected, 1e-6 if model == "llama" else 0.05)[case]
    reference(prob, objective, module=expected)
    _, got = fit(prob, callbacks, module=ZooClassifier(model, attn=attn))
    if case == "data_auto":
        assert callbacks[0].resolved_method == "finite_difference"
        assert "method='auto' -> 'finite_difference'" in repr(callbacks[0])
    want, initial = expected.state_dict(), ZooClassifier(model).state_dict()
    worst = max(((v - want[k]).abs().max().item(), k) for k, v in got.state_dict().items())
    # Difference quotients (VAT's ξ = 1e-3, the data penalty's relative step 1e-2) amplify float64 rounding of
    # two op orders by about 1/step, and three SGD steps by more: 1e-6 there; everything else to 1e-9.
    assert worst[0] <= (1e-6 if case in ("vat", "data_auto") else 1e-9), worst
    assert max((v - initial[k]).abs().max() for k, v in want.items()) > 1e-3  # it trained
    # the embedding table before the target trains too (nothing detached), by far more than the tolerance
    assert (want[prob.table] - initial[prob.table]).abs().max() > 1e-7


def test_auto_keeps_the_double_backward_where_the_model_has_one():
    prob = problem("distilbert")
    callback = DataGradientPenalty(0.05, target=prob.target)
    fit(prob, [callback], module=ZooClassifier("distilbert", attn="eager"), steps=1)
    assert callback.resolved_method == "double_backward"


# ---- parameter perturbations leave the model as it was ----------------------------------------------------

class Aliased(pl.LightningModule):
    """A parameter registered on a parent and on its child (as Opacus' DP recurrent layers do)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2, bias=False).double()
        self.w = self.lin.weight
        self.head = nn.Linear(2, 1).double()

    def training_step(self, batch, batch_idx=0):
        x, y = batch
        return ((self.head(torch.tanh(self.lin(x))) - y) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def structure(module: nn.Module) -> list[tuple]:
    """Every name a parameter is reachable under, with the object's identity, type and requires_grad."""
    return [(n, id(p), type(p), p.requires_grad) for n, p in module.named_parameters(remove_duplicate=False)]


def _aliased_loader():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g, dtype=torch.float64), torch.randn(8, 1, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(list(zip(x, y, strict=True)), batch_size=8)


@pytest.mark.parametrize("model", ["t5_resized", "bart", "gpt2_lm", "aliased"])
def test_the_finite_difference_parameter_penalty_keeps_every_parameter_and_tie(model):
    module = Aliased() if model == "aliased" else HFModule(ZOO[model], attn="eager")
    module.model.get_submodule("lm_head").weight.requires_grad_(True) if model != "aliased" else None
    before = structure(module)
    data = _aliased_loader() if model == "aliased" else loader(ZOO[model])
    pl.Trainer(max_steps=2, callbacks=[ParameterGradientPenalty(0.1, method="finite_difference")],
               **QUIET).fit(module, data)
    assert structure(module) == before
    if model == "aliased":
        assert module.w is module.lin.weight
    else:
        inner = module.model
        assert inner.get_output_embeddings().weight is inner.get_input_embeddings().weight


@pytest.mark.parametrize("model", ["t5_resized", "bart", "gpt2_lm", "aliased"])
def test_the_finite_difference_parameter_penalty_converges_to_the_double_backward(model):
    """Tied weights count once: ∇ of the finite-difference objective → ∇ of the double-backward one at first
    order in the step (float64). A tie counted twice, or a parameter left displaced, is an O(1) error."""

    def objective_grad(method: str, step: float) -> torch.Tensor:
        module = Aliased() if model == "aliased" else HFModule(ZOO[model], attn="eager")
        batch = next(iter(_aliased_loader() if model == "aliased" else loader(ZOO[model])))
        penalty = ParameterGradientPenalty(0.5, method=method, step=step)
        total = penalized_loss(module, lambda b, m=module: m.training_step(b), batch, [penalty])
        return torch.cat([g.flatten() for g in torch.autograd.grad(total, list(module.parameters()))])

    exact = objective_grad("double_backward", 1e-3)
    errors = [float((objective_grad("finite_difference", h) - exact).norm() / exact.norm()) for h in (1e-4, 1e-5)]
    assert errors[1] < 5e-3 and errors[1] < 0.2 * errors[0], errors


# ---- per-sample norms on every model --------------------------------------------------------------------------

def _input(zoo, data):
    return data["pixel_values"] if zoo.kind == "vit" else data["input_ids"]


def _loop_norms(module, zoo, data):
    """The reference: each sample alone (a batch of one), the norm of its whole gradient, every parameter once."""
    params = [p for p in module.parameters() if p.requires_grad]
    x, out = _input(zoo, data), []
    for i in range(x.shape[0]):
        one = {k: v[i:i + 1] for k, v in data.items()}
        grads = torch.autograd.grad(per_sample_loss(module(x[i:i + 1]), one)[0], params, allow_unused=True)
        out.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    return torch.stack(out)


@pytest.mark.parametrize("n", [4, 6], ids=["B=4", "B=T=6"])  # B = T: a (T, T) bias must not pass for batched
@pytest.mark.parametrize("model", list(ZOO))
def test_per_sample_parameter_norms_equal_a_loop_over_samples(model, n):
    zoo = ZOO[model]
    module = HFModule(zoo).eval()
    data = batch(zoo, n)
    want = _loop_norms(module, zoo, data)
    for _ in range(2):  # the first call probes the structure; the second measures each layer in the backward
        _, got = per_sample_grad_norms(module, _input(zoo, data), lambda out: per_sample_loss(out, data))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


FUSED_REFUSED = {"t5": "relative_attention_bias", "bart": "embed_positions", "opt": r"fc1.*not the batch",
                 "t5_resized": "runs more than once"}


@pytest.mark.parametrize("model", [m for m in ZOO if ZOO[m].kind in ("cls", "vit") or m in FUSED_REFUSED])
def test_the_fused_monitor_equals_recompute_or_refuses_naming_the_layer(model):
    """Fused mode reads the norms off the training step's backward, the default recompute mode off a re-run of the
    step (padded batches: both see the mask); where a layer does not keep the samples apart fused mode refuses and
    names recompute, which measures any model with `forward_fn` and a per-sample `loss_fn` (above)."""
    zoo = ZOO[model]
    key = "pixel_values" if zoo.kind == "vit" else "input_ids"
    values = {}
    for mode in ("fused", "recompute"):
        monitor = GradientNormMonitor(every_n_steps=1, mode=mode, input_key=key, target=zoo.embeddings,
                                      histograms=False)
        module = HFModule(zoo)
        trainer = pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET)
        if mode == "fused" and model in FUSED_REFUSED:
            with pytest.raises((ValueError, RuntimeError), match=FUSED_REFUSED[model]):
                trainer.fit(module, loader(zoo))
            return
        trainer.fit(module, loader(zoo))
        values[mode] = {k: float(v) for k, v in trainer.callback_metrics.items() if "grad_norm/" in k
                        and "param_batch" not in k}
    assert values["fused"] and values["fused"] == pytest.approx(values["recompute"], rel=1e-9)


class AliasedNet(nn.Module):
    """``self.w = self.lin.weight``: one parameter under two names, on a parent and on its child."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2, bias=False)
        self.w = self.lin.weight
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x)))


def test_an_aliased_parameter_counts_once():
    """Was exactly 2× the true norm: the parent's replay and the child's closed form both counted it."""
    model = AliasedNet().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    _, got = per_sample_grad_norms(model, x, lambda out: out[:, 0])
    params = list(model.parameters())
    want = torch.stack([torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(model(x[i:i + 1])[0, 0], params)))
                        for i in range(5)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_messages_point_to_the_fix():
    """ViT with dropout in fused mode names mode='recompute' (it said "call model.eval()"); a causal LM without
    `loss_fn` names `loss_fn` (it raised torch's "Expected target size")."""
    vit = ZOO["vit"]
    fused = GradientNormMonitor(every_n_steps=1, mode="fused", input_key="pixel_values", histograms=False)
    with pytest.raises(ValueError, match=r"ViTEmbeddings.*draws random numbers.*Use mode='recompute'"):
        pl.Trainer(max_steps=1, callbacks=[fused], **QUIET).fit(HFModule(vit, dropout=0.1), loader(vit))
    llama = ZOO["llama"]
    recompute = GradientNormMonitor(every_n_steps=1, input_key="input_ids", target=llama.embeddings, histograms=False,
                                    forward_fn=lambda m, b: m.model(input_ids=b["input_ids"],
                                                                    attention_mask=b["attention_mask"]))
    with pytest.raises(ValueError, match=r"returned \[4, 6, 40\] \(a language model's.*Pass your per-sample loss"):
        pl.Trainer(max_steps=1, callbacks=[recompute], **QUIET).fit(HFModule(llama), loader(llama))


# ---- the parameter penalty and flooding on every model, against hand-written loops -------------------------------

def _sgd_reference(module: HFModule, zoo, objective_grads, steps: int = 3, lr: float = 0.1) -> None:
    data = next(iter(loader(zoo)))
    params = [p for p in module.parameters() if p.requires_grad]
    for _ in range(steps):
        grads = objective_grads(module, data, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g


def _param_fd_grads(weight: float, rel: float = 1e-3):
    """g + 2w·(∇L(θ + h·g) − g)/h, h = rel·‖θ‖/‖g‖, the parameters moved by hand and put back."""
    def grads(module, data, params):
        g = torch.autograd.grad(module.training_step(data), params)
        g_norm = torch.sqrt(sum(x.square().sum() for x in g))
        h = float(rel * torch.sqrt(sum(p.detach().square().sum() for p in params)) / g_norm)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, x in zip(params, g, strict=True):
                p += h * x
        g2 = torch.autograd.grad(module.training_step(data), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        return [a + 2 * weight * (b - a) / h for a, b in zip(g, g2, strict=True)]
    return grads


def _sam_grads(rho: float, adaptive: bool):
    """∇L(θ + ε), ε = ρ·g/‖g‖ (SAM) or ρ·θ²⊙g/‖θ⊙g‖ (ASAM), the parameters moved by hand and put back."""
    def grads(module, data, params):
        g = torch.autograd.grad(module.training_step(data), params)
        scaled = [p.detach().abs() * x for p, x in zip(params, g, strict=True)] if adaptive else g
        norm = torch.sqrt(sum(x.square().sum() for x in scaled))
        eps = [rho * (p.detach().square() if adaptive else 1) * x / norm for p, x in zip(params, g, strict=True)]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, e in zip(params, eps, strict=True):
                p += e
        g_sam = torch.autograd.grad(module.training_step(data), params)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
        return list(g_sam)
    return grads


def _flooding_grads(level: float):
    def grads(module, data, params):
        loss = module.training_step(data)
        return torch.autograd.grad((loss - level).abs() + level, params)
    return grads


@pytest.mark.parametrize("case", ["parameter_finite_difference", "flooding_below", "flooding_above", "sam", "asam"])
@pytest.mark.parametrize("model", list(ZOO))
def test_parameter_penalty_and_flooding_match_hand_written_loops(model, case):
    zoo = ZOO[model]
    if case == "parameter_finite_difference":
        callback, objective = ParameterGradientPenalty(0.05, method="finite_difference"), _param_fd_grads(0.05)
    elif case in ("sam", "asam"):  # tied embeddings (GPT-2, T5, BART) displaced once, as one parameter
        rho = 0.05 if case == "sam" else 0.5
        callback, objective = (SharpnessAwareMinimization(rho, adaptive=case == "asam"),
                               _sam_grads(rho, adaptive=case == "asam"))
    else:
        level = 100.0 if case == "flooding_below" else 0.0  # below the flood level the step ascends
        callback, objective = Flooding(level), _flooding_grads(level)
    expected = HFModule(zoo)
    _sgd_reference(expected, zoo, objective)
    got = HFModule(zoo)
    pl.Trainer(max_steps=3, callbacks=[callback], **QUIET).fit(got, loader(zoo))
    initial = HFModule(zoo).state_dict()
    worst = max(((v - expected.state_dict()[k]).abs().max().item(), k) for k, v in got.state_dict().items())
    # the difference quotient amplifies two op orders' float64 rounding by about 1/h
    assert worst[0] <= (1e-7 if case == "parameter_finite_difference" else 1e-12), worst
    assert max((v - initial[k]).abs().max() for k, v in expected.state_dict().items()) > 1e-4  # it trained
