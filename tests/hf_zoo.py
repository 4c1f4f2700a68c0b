"""Tiny Hugging Face models built from local configs (no download), as LightningModules, for the zoo tests.

Each entry builds a model whose ``training_step`` takes a dict batch (``input_ids``/``attention_mask`` or
``pixel_values``, ``labels``) and returns the model's own loss; ``embeddings`` names the layer the input-space
callbacks perturb (``target=``) and ``logits_fn`` gives (B, C) logits for VAT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

transformers = __import__("pytest").importorskip("transformers")

VOCAB, T, B, CLASSES = 40, 6, 4, 3  # VOCAB ≥ tests/callbacks/test_targets.py's, CLASSES equal


@dataclass(frozen=True)
class Zoo:
    name: str
    build: Callable[[str, float], torch.nn.Module]  # (attn_implementation, dropout) -> HF model
    embeddings: str  # the target of the input-space callbacks, as a path inside the LightningModule
    kind: str  # "cls" (sequence classification), "lm" (causal LM), "s2s" (seq2seq), "vit"


def _common(attn: str, dropout: float) -> dict:
    return dict(attn_implementation=attn)


def gpt2_cls(attn, p):
    c = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2, num_labels=CLASSES,
                                pad_token_id=0, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **_common(attn, p))
    return transformers.GPT2ForSequenceClassification(c)


def gpt2_lm(attn, p):
    c = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **_common(attn, p))
    return transformers.GPT2LMHeadModel(c)


def llama(attn, p):
    c = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                 attention_dropout=p, **_common(attn, p))
    return transformers.LlamaForCausalLM(c)


def roberta(attn, p):
    c = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32, max_position_embeddings=24, num_labels=CLASSES,
                                   hidden_dropout_prob=p, attention_probs_dropout_prob=p, pad_token_id=0,
                                   **_common(attn, p))
    return transformers.RobertaForSequenceClassification(c)


def distilbert(attn, p):
    c = transformers.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                      max_position_embeddings=16, num_labels=CLASSES, dropout=p, attention_dropout=p,
                                      seq_classif_dropout=p, **_common(attn, p))
    return transformers.DistilBertForSequenceClassification(c)


def t5(attn, p, resized=False):
    c = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                              relative_attention_num_buckets=8, dropout_rate=p, decoder_start_token_id=0,
                              pad_token_id=0, **_common(attn, p))
    model = transformers.T5ForConditionalGeneration(c)
    if resized:
        model.resize_token_embeddings(VOCAB + 4)
    return model


def bart(attn, p):
    c = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                decoder_ffn_dim=32, max_position_embeddings=16, dropout=p, attention_dropout=p,
                                activation_dropout=p, pad_token_id=1, decoder_start_token_id=2, **_common(attn, p))
    return transformers.BartForConditionalGeneration(c)


def opt(attn, p):
    c = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                               num_attention_heads=2, max_position_embeddings=16, word_embed_proj_dim=16,
                               dropout=p, attention_dropout=p, pad_token_id=1, **_common(attn, p))
    return transformers.OPTForCausalLM(c)


def vit(attn, p):
    c = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=32, num_labels=CLASSES,
                               hidden_dropout_prob=p, attention_probs_dropout_prob=p, **_common(attn, p))
    return transformers.ViTForImageClassification(c)


ZOO = {z.name: z for z in [
    Zoo("gpt2_cls", gpt2_cls, "model.transformer.wte", "cls"),
    Zoo("gpt2_lm", gpt2_lm, "model.transformer.wte", "lm"),
    Zoo("llama", llama, "model.model.embed_tokens", "lm"),
    Zoo("roberta", roberta, "model.roberta.embeddings.word_embeddings", "cls"),
    Zoo("distilbert", distilbert, "model.distilbert.embeddings.word_embeddings", "cls"),
    Zoo("t5", t5, "model.encoder.embed_tokens", "s2s"),
    Zoo("t5_resized", lambda a, p: t5(a, p, resized=True), "model.shared", "s2s"),
    Zoo("bart", bart, "model.model.encoder.embed_tokens", "s2s"),
    Zoo("opt", opt, "model.model.decoder.embed_tokens", "lm"),
    Zoo("vit", vit, "model.vit.embeddings.patch_embeddings", "vit"),
]}


class HFModule(pl.LightningModule):
    """A Hugging Face model trained on its own loss with SGD; float64 unless told otherwise."""

    def __init__(self, zoo: Zoo, attn: str = "sdpa", dropout: float = 0.0, dtype=torch.float64, seed: int = 0):
        super().__init__()
        self.zoo = zoo
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.model = zoo.build(attn, dropout).to(dtype)

    def inputs(self, batch):
        if self.zoo.kind == "vit":
            return dict(pixel_values=batch["pixel_values"])
        keys = ("input_ids", "attention_mask", "decoder_input_ids") if self.zoo.kind == "s2s" else \
            ("input_ids", "attention_mask")
        return {k: batch[k] for k in keys}

    def forward(self, batch):
        """The model's output on a dict batch, or on the bare input tensor (ids or pixels) a monitor passes."""
        if isinstance(batch, torch.Tensor):
            key = "pixel_values" if self.zoo.kind == "vit" else "input_ids"
            extra = {"decoder_input_ids": batch.flip(1)[:, : T - 2]} if self.zoo.kind == "s2s" else {}
            return self.model(**{key: batch}, **extra)
        return self.model(**self.inputs(batch))

    def logits(self, batch):
        logits = self(batch).logits
        return logits if logits.ndim == 2 else logits[:, -1]  # an LM's next-token distribution at the end

    def training_step(self, batch, batch_idx=0):
        labels = batch["labels"] if self.zoo.kind in ("cls", "vit") else batch["lm_labels"]
        return self.model(**self.inputs(batch), labels=labels).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batch(zoo: Zoo, n: int = B, dtype=torch.float64, seed: int = 1, padded: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.long)
    if padded:
        mask[: n // 2, -2:] = 0  # right padding on half of the samples
    out = dict(input_ids=ids, attention_mask=mask, labels=torch.randint(0, CLASSES, (n,), generator=g),
               lm_labels=torch.where(mask.bool(), ids, -100), decoder_input_ids=ids.flip(1)[:, : T - 2])
    if zoo.kind == "s2s":
        out["lm_labels"] = ids.flip(1)[:, 1: T - 1]
    if zoo.kind == "vit":
        out = dict(pixel_values=torch.randn(n, 3, 8, 8, generator=g, dtype=dtype),
                   labels=torch.randint(0, CLASSES, (n,), generator=g))
    return out


def loader(zoo: Zoo, n: int = B, dtype=torch.float64, seed: int = 1, padded: bool = True) -> DataLoader:
    data = batch(zoo, n, dtype, seed, padded)
    rows = [{k: v[i] for k, v in data.items()} for i in range(n)]
    return DataLoader(rows, batch_size=n)


def per_sample_loss(outputs, batch) -> torch.Tensor:
    """ℓᵢ of a zoo model's output: cross-entropy of the (B, C) logits, or of an LM's last position."""
    logits = outputs.logits
    if logits.ndim == 3:  # LM and seq2seq: the next token after the sequence, labelled by the first id
        target = batch["input_ids"][:, 0] if "input_ids" in batch else batch["labels"]
        return torch.nn.functional.cross_entropy(logits[:, -1], target, reduction="none")
    return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
