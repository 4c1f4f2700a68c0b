"""The monitors measure the function being trained: on Hugging Face models with padded batches, every entry of the
batch reaches the model in the monitor's pass (the attention mask above all).

The oracle is a loop over the samples of the real training step: each sample alone (a batch of one, its mask
with it), the gradient of its loss by plain autograd. The control: the same model with the mask dropped (what
the monitors measured before) has other norms, so the comparison can fail.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lightning_gp import GradientNormMonitor
from tests.hf_zoo import ZOO, HFModule, Zoo, batch, loader, transformers

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def bert(attn, p):
    c = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=16, num_labels=3, hidden_dropout_prob=p,
                                attention_probs_dropout_prob=p, attn_implementation=attn)
    return transformers.BertForSequenceClassification(c)


MODELS = {"bert": Zoo("bert", bert, "model.bert.embeddings.word_embeddings", "cls"),
          "gpt2_cls": ZOO["gpt2_cls"], "vit": ZOO["vit"], "t5": ZOO["t5"], "gpt2_lm": ZOO["gpt2_lm"]}


def _one(data: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in data.items()}


def _loop(module: HFModule, zoo: Zoo, data: dict, loss_of) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: ‖∇θℓᵢ‖ over every trainable parameter and ‖∇ℓᵢ‖ w.r.t. the monitored site (the embedding
    output at the real positions, or the pixels), each sample run alone with its own mask."""
    params = [p for p in module.parameters() if p.requires_grad]
    site = None if zoo.kind == "vit" else module.get_submodule(zoo.embeddings)
    param_norms, input_norms = [], []
    for i in range(len(next(iter(data.values())))):
        one = _one(data, i)
        held: dict = {}
        if site is None:
            one["pixel_values"] = one["pixel_values"].clone().requires_grad_(True)
            wrt = one["pixel_values"]
        else:
            def hook(mod, args, out, held=held):
                held["d"] = torch.zeros_like(out, requires_grad=True)
                return out + held["d"]
            handle = site.register_forward_hook(hook)
        loss = loss_of(module, one)
        if site is not None:
            handle.remove()
            wrt = held["d"]
        grads = torch.autograd.grad(loss, [*params, wrt], allow_unused=True)
        param_norms.append(torch.sqrt(sum(g.square().sum() for g in grads[:-1] if g is not None)))
        g = grads[-1]
        if site is not None:
            g = g * one["attention_mask"][..., None].to(g.dtype)
        input_norms.append(g.norm())
    return torch.stack(param_norms), torch.stack(input_norms)


def _differs(other: tuple, want: tuple) -> None:
    """The control: the mask-dropped norms are 10⁴ × the comparison's tolerance (1e-9) away, or more."""
    gap = max(float(((o - w).abs() / w.abs()).max()) for o, w in zip(other, want, strict=True))
    assert gap > 1e-5, gap


def _site(zoo: Zoo) -> dict:
    return dict(input_key="pixel_values") if zoo.kind == "vit" else dict(target=zoo.embeddings)


def _measured(monitor: GradientNormMonitor, module, data) -> tuple[torch.Tensor, torch.Tensor]:
    _, per_sample = monitor.measure(module, data)
    return per_sample["grad_norm/param_per_sample"], per_sample["grad_norm/input"]


@pytest.mark.parametrize("model", ["bert", "gpt2_cls", "vit"])
def test_the_default_monitor_measures_the_training_step_with_its_mask(model):
    """No loss_fn, no forward_fn: the monitor re-runs training_step, so the mask reaches the model."""
    zoo = MODELS[model]
    module, data = HFModule(zoo).eval(), batch(zoo, 6)
    want = _loop(module, zoo, data, lambda m, one: m.training_step(one))
    got = _measured(GradientNormMonitor(histograms=False, **_site(zoo)), module, data)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
    if zoo.kind == "vit":
        return
    # the control: the model called without the mask (the old recompute pass) measures another function
    dropped = GradientNormMonitor(histograms=False, forward_fn=lambda m, b: m.model(input_ids=b["input_ids"]),
                                  loss_fn=lambda out, b: F.cross_entropy(out.logits, b["labels"], reduction="none"),
                                  **_site(zoo))
    _differs(_measured(dropped, module, data), want)


def _lm_loss(outputs, batch):
    """A causal LM's per-sample loss: the mean next-token cross-entropy over the sample's real positions."""
    logits, ids, mask = outputs.logits[:, :-1], batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
    tokens = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    return (tokens * mask).sum(1) / mask.sum(1)


def _s2s_loss(outputs, batch):
    """A seq2seq model's per-sample loss: the mean cross-entropy over the sample's target tokens."""
    logits, labels = outputs.logits, batch["lm_labels"]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).mean(1)


RECIPES = {  # forward_fn as training_step calls the model, and its per-sample loss
    "gpt2_lm": (lambda m, b: m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), _lm_loss),
    "t5": (lambda m, b: m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                decoder_input_ids=b["decoder_input_ids"]), _s2s_loss),
}


@pytest.mark.parametrize("model", list(RECIPES))
def test_the_explicit_recipe_measures_the_per_sample_loss_with_its_mask(model):
    """forward_fn + a per-sample loss_fn (the docs' recipes): equal to the loop over samples of that loss, and
    different from the same loss with the mask dropped."""
    zoo, (forward_fn, loss_fn) = MODELS[model], RECIPES[model]
    module, data = HFModule(zoo).eval(), batch(zoo, 6)
    if zoo.kind == "lm":  # left padding: a causal LM's real tokens never see right padding, mask or not
        data["attention_mask"] = data["attention_mask"].flip(1)
    want = _loop(module, zoo, data, lambda m, one: loss_fn(forward_fn(m, one), one).sum())
    monitor = GradientNormMonitor(histograms=False, forward_fn=forward_fn, loss_fn=loss_fn, **_site(zoo))
    got = _measured(monitor, module, data)
    torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-9, atol=1e-12)
    unmasked = {**data, "attention_mask": torch.ones_like(data["attention_mask"])}
    other = _measured(GradientNormMonitor(histograms=False, forward_fn=lambda m, b: forward_fn(m, unmasked),
                                          loss_fn=loss_fn, **_site(zoo)), module, data)
    _differs(other, want)


def test_the_default_monitor_refuses_a_model_whose_layers_mix_samples_and_names_the_recipe():
    """T5's (T, T) relative-position bias is shared by the samples: the step's scalar loss cannot be split per
    sample there, so the monitor says so and names forward_fn/loss_fn (which measure it exactly, above)."""
    zoo = MODELS["t5"]
    monitor = GradientNormMonitor(every_n_steps=1, histograms=False, target=zoo.embeddings)
    with pytest.raises(ValueError, match=r"relative_attention_bias.*Pass `forward_fn=.*per-sample `loss_fn="):
        pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(HFModule(zoo), loader(zoo))


@pytest.mark.parametrize("recipe", [False, True], ids=["training_step", "forward_fn"])
def test_a_target_that_never_runs_names_the_modules_sharing_its_weight(recipe):
    """T5's `shared` embedding never runs: encoder.embed_tokens and decoder.embed_tokens use its weight."""
    zoo = MODELS["t5"]
    kwargs = dict(zip(("forward_fn", "loss_fn"), RECIPES["t5"], strict=True)) if recipe else {}
    monitor = GradientNormMonitor(every_n_steps=1, histograms=False, target="model.shared", **kwargs)
    with pytest.raises(RuntimeError, match=r"`Embedding` did not run.*share its weight: .*`model.encoder.embed_tok"):
        pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(HFModule(zoo), loader(zoo))


def test_a_padded_bert_in_a_trainer_logs_the_masked_norms():
    """The user's first try: a dict batch, the defaults, a Trainer. The logged mean is the loop's."""
    zoo = MODELS["bert"]
    module = HFModule(zoo)
    monitor = GradientNormMonitor(every_n_steps=1, histograms=False, target=zoo.embeddings)
    data = batch(zoo, 4)
    want = _loop(HFModule(zoo).eval(), zoo, data, lambda m, one: m.training_step(one))
    module.configure_optimizers = lambda: torch.optim.SGD(module.parameters(), lr=0.0)
    pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(module, loader(zoo))
    assert monitor.last_logged["grad_norm/param_per_sample_mean"] == pytest.approx(float(want[0].mean()), rel=1e-9)
    assert monitor.last_logged["grad_norm/input_max"] == pytest.approx(float(want[1].max()), rel=1e-9)
