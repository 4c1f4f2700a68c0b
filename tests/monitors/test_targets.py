"""GradientNormMonitor(target=...) and the manual-optimization path with a target, against torch.func."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_gp import AdversarialTraining, DataGradientPenalty, GradientNormMonitor, penalized_loss

QUIET = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
B, T, V = 16, 5, 12


class Tok(pl.LightningModule):
    """Token ids → embeddings → mean over the real positions → logits."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(V, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, ids, mask=None):
        h = self.embed(ids)
        mask = torch.ones(ids.shape, dtype=h.dtype) if mask is None else mask.to(h.dtype)
        return self.head((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # the monitor measures the initial model


def data():
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(0, V, (B, T), generator=g), torch.randint(0, 3, (B,), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[::2, -2:] = 0  # padded tails
    return ids, labels, mask


def reference_norms(model, ids, labels, mask):
    """‖∇ℓᵢ‖ w.r.t. the embedding output, by torch.func: each sample alone, its padded rows excluded."""
    emb = model.embed(ids).detach()

    def loss_i(e, m, y):
        h = model.head((e * m[:, None]).sum(0) / m.sum())
        return F.cross_entropy(h[None], y[None])

    grads = torch.func.vmap(torch.func.grad(loss_i))(emb, mask.to(emb.dtype), labels)
    return (grads * mask[..., None]).flatten(1).norm(dim=1)


def _per_sample_ce(outputs, batch):
    return F.cross_entropy(outputs, batch["labels"], reduction="none")


@pytest.mark.parametrize("how", ["recompute", "fused", "forward_fn"])
def test_input_norms_on_the_embedding_output(how):
    """Every way of measuring sees the mask the training step passes: the step itself (recompute, fused) or the
    explicit forward_fn. The control: the function with the mask dropped has other norms."""
    ids, labels, mask = data()
    batches = [dict(input_ids=ids[i], labels=labels[i], attention_mask=mask[i]) for i in range(B)]
    model = Tok()
    kwargs = {"fused": dict(mode="fused"),
              "forward_fn": dict(forward_fn=lambda m, b: m(b["input_ids"], b["attention_mask"]),
                                 loss_fn=_per_sample_ce)}.get(how, {})
    monitor = GradientNormMonitor(every_n_steps=1, target="embed", input_key="input_ids", histograms=False, **kwargs)
    pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(model, DataLoader(batches, batch_size=B))
    ref = reference_norms(model, ids, labels, mask)
    assert monitor.last_logged["grad_norm/input_mean"] == pytest.approx(float(ref.mean()), rel=1e-5)
    assert monitor.last_logged["grad_norm/input_max"] == pytest.approx(float(ref.max()), rel=1e-5)
    # the control: `model(ids)`, every position real in the forward (the old recompute pass), differs
    emb = model.embed(ids).detach()
    grads = torch.func.vmap(torch.func.grad(
        lambda e, y: F.cross_entropy(model.head(e.mean(0))[None], y[None])))(emb, labels)
    dropped = (grads * mask[..., None]).flatten(1).norm(dim=1)
    assert abs(float(dropped.mean()) - float(ref.mean())) > 1e-2 * float(ref.mean())


@pytest.mark.parametrize("mode", ["recompute", "fused"])
def test_a_target_needs_no_input_key(mode):
    """With a target the batch's input is only counted (∇ is taken w.r.t. the target's output): a dict batch whose
    keys are none of the default input names is measured without `input_key`, in both modes."""
    ids, labels, mask = data()
    batches = [dict(input_ids=ids[i], labels=labels[i], attention_mask=mask[i]) for i in range(B)]
    model = Tok()
    monitor = GradientNormMonitor(every_n_steps=1, target="embed", histograms=False, mode=mode)
    pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(model, DataLoader(batches, batch_size=B))
    ref = reference_norms(model, ids, labels, mask)
    assert monitor.last_logged["grad_norm/input_mean"] == pytest.approx(float(ref.mean()), rel=1e-5)


def test_a_loss_fn_without_forward_fn_refuses_a_batch_with_a_mask():
    """`module(input)` would drop the attention mask: the monitor says so and names both fixes."""
    ids, labels, mask = data()
    batches = [dict(input_ids=ids[i], labels=labels[i], attention_mask=mask[i]) for i in range(B)]
    monitor = GradientNormMonitor(every_n_steps=1, target="embed", input_key="input_ids", loss_fn=_per_sample_ce)
    with pytest.raises(ValueError, match=r"calls the module on the input alone.*\['attention_mask'\].*Drop "
                                         r"`loss_fn`.*forward_fn=lambda module, batch"):
        pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(Tok(), DataLoader(batches, batch_size=B))


def test_a_target_that_does_not_exist_is_named_with_the_nearest_modules():
    ids, labels, mask = data()
    batches = [dict(input_ids=ids[i], labels=labels[i], attention_mask=mask[i]) for i in range(B)]
    monitor = GradientNormMonitor(every_n_steps=1, mode="fused", target="embedd", input_key="input_ids")
    with pytest.raises(ValueError, match=r"`target='embedd'` is not a submodule of `Tok`. Nearest module names: "
                                         r"\['embed'"):
        pl.Trainer(max_steps=1, callbacks=[monitor], **QUIET).fit(Tok(), DataLoader(batches, batch_size=B))


@pytest.mark.parametrize("make", [
    lambda: DataGradientPenalty(0.5, target="embed"),
    lambda: AdversarialTraining(0.3, target="embed", adversarial_weight=0.5),
], ids=["data_penalty", "fgm"])
def test_penalized_loss_takes_callbacks_with_a_target(make):
    """The manual-optimization path: the target resolves against the module given to `penalized_loss`."""
    ids, labels, mask = data()
    model = Tok()
    batch = dict(input_ids=ids, labels=labels, attention_mask=mask)

    def loss_fn(b):
        return F.cross_entropy(model(b["input_ids"], b["attention_mask"]), b["labels"])

    total = penalized_loss(model, loss_fn, batch, [make()])
    assert float(total) > float(loss_fn(batch))
    total.backward()
    assert model.embed.weight.grad is not None and model.embed.weight.grad.abs().sum() > 0
