"""The callbacks page's FGM recipe learns: on a tiny Hugging Face BERT (its own initialisation, embeddings of norm
≈ 0.5 a sequence), FGM from the page's snippet reaches a train accuracy within 5 points of plain training."""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

transformers = pytest.importorskip("transformers")

PAGE = Path(__file__).resolve().parents[2] / "docs" / "callbacks.md"
VOCAB, T, N = 30, 12, 256


def data() -> list[dict]:
    """Label 1 where token 3 occurs in the sequence: a task a tiny BERT learns in a few epochs."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (N, T), generator=g)
    plant = torch.rand(N, generator=g) < 0.5
    ids[plant, torch.randint(0, T, (int(plant.sum()),), generator=g)] = 3
    return [{"input_ids": i, "attention_mask": torch.ones(T, dtype=torch.long), "labels": (i == 3).any().long()}
            for i in ids]


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=32, num_labels=2,
                                         attn_implementation="eager")
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.model = transformers.BertForSequenceClassification(config)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def train_accuracy(callbacks: list, epochs: int = 10) -> float:
    pl.seed_everything(0, verbose=False)
    module = Classifier()
    samples = data()
    pl.Trainer(max_epochs=epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(
        module, DataLoader(samples, batch_size=32, shuffle=True))
    batch = torch.utils.data.default_collate(samples)
    module.eval()
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return float((logits.argmax(1) == batch["labels"]).float().mean())


def test_the_pages_fgm_snippet_learns_as_plain_training_does():
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", PAGE.read_text(), re.S) if "fgm =" in block]
    scope: dict = {}
    exec(compile(snippet, "docs/callbacks.md FGM snippet", "exec"), scope)
    plain = train_accuracy([])
    fgm = train_accuracy([scope["fgm"]])
    assert plain > 0.85, plain  # the task is learnable
    assert fgm >= plain - 0.05, (fgm, plain)
