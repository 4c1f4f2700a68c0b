"""The robust-tokens example: its token data, its embedding PGD attack, and a tiny end-to-end run of its CLI."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from examples.robust_tokens import (
    CLS_ID,
    SEQ_LEN,
    VARIANTS,
    TokenDigitsDataModule,
    TokenTransformer,
    cli,
    corrupt_tokens,
    embedding_loss,
    embedding_pgd,
)
from lightning_gp.functional import per_sample_norm, perturbed_output


def test_digits_become_token_sequences_with_a_class_token():
    dm = TokenDigitsDataModule(batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    ids = batch["input_ids"]
    assert ids.shape == (32, SEQ_LEN) and ids.dtype == torch.long
    assert bool(ids[:, 0].eq(CLS_ID).all()) and int(ids[:, 1:].min()) >= 0 and int(ids[:, 1:].max()) <= 16
    assert bool(batch["attention_mask"].eq(1).all())
    test = next(iter(dm.test_dataloader()))
    moved = test["corrupted_ids"] != test["input_ids"]
    assert not bool(moved[:, 0].any())  # the class token is never corrupted
    assert int(moved.sum(1).max()) <= 8  # k = 8 pixels at most (a clipped move can leave one unchanged)
    assert torch.equal(corrupt_tokens(dm.test_set.ids, 8), dm.test_set.corrupted)  # one fixed draw
    assert sum(b["labels"].shape[0] for b in dm.test_dataloader()) == 450


def test_embedding_pgd_stays_in_the_ball_and_hurts_a_trained_model():
    torch.manual_seed(0)
    dm = TokenDigitsDataModule(batch_size=32, train_subset=512, test_subset=96)
    model = TokenTransformer(dim=32, ff_dim=64, lr=5e-3)
    trainer = L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    model.eval()
    test = next(iter(dm.test_dataloader()))
    batch = {k: test[k] for k in ("input_ids", "attention_mask", "labels")}
    eps = 3.0
    delta = embedding_pgd(model, batch, epsilon=eps, steps=5)
    assert delta.shape == (96, SEQ_LEN, 32)
    assert bool((per_sample_norm(delta) <= eps * (1 + 1e-5)).all())
    with torch.no_grad():
        clean_logits = model(batch["input_ids"], batch["attention_mask"])
        clean_loss = F.cross_entropy(clean_logits, batch["labels"])
        adv_loss = embedding_loss(model, batch, delta).mean()
    clean_acc = float((clean_logits.argmax(1) == batch["labels"]).float().mean())
    assert clean_acc > 0.2  # above the 10 % of chance: it has learned something
    assert float(adv_loss) > float(clean_loss) + 0.1  # the attack raises the loss ...
    with torch.no_grad(), perturbed_output(model.embed, delta):
        adv_acc = float((model(batch["input_ids"]).argmax(1) == batch["labels"]).float().mean())
    assert adv_acc < clean_acc  # ... and lowers the accuracy
    with torch.no_grad():
        zero = embedding_loss(model, batch, torch.zeros_like(delta)).mean()
    torch.testing.assert_close(zero, clean_loss)  # δ = 0 is the clean model


def test_cli_runs_every_training_end_to_end(tmp_path: Path, capsys):
    out_dir = tmp_path / "out"
    result = cli([
        "--epochs", "1", "--dim", "16", "--pgd_steps", "2", "--train_subset", "128", "--test_subset", "64",
        "--batch_size", "32", "--out_dir", str(out_dir), "--progress_bar", "false",
    ])
    printed = capsys.readouterr().out
    assert [r["variant"] for r in result["results"]] == list(VARIANTS)
    for r in result["results"]:
        assert all(0.0 <= r[k] <= 1.0 for k in ("clean", "robust", "corrupt"))
    table = (out_dir / "results.md").read_text()
    assert table.strip() in printed
    assert "| PGD-2 acc % |" in table
    for label in ("| plain |", "| FGM (embeddings) |", "| FreeLB-3 |", "| VAT |", "| data penalty |"):
        assert label in table
    png = out_dir / "robust_tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # W&B offline (the default): one run per training plus the summary run, which holds the chart.
    runs = sorted((out_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == len(VARIANTS) + 1
    assert list((out_dir / "wandb").glob("offline-run-*/files/media/images/accuracy_chart*.png"))
