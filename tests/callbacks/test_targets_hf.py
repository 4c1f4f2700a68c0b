"""A real Hugging Face model (BERT, built from a local config) with ``target=`` its word embeddings.

Each callback against a hand-written loop (plain torch: the reference feeds ``inputs_embeds = E[ids] + δ·mask``
to the model, no hook, no lightning_gp), float64, and under 2-process DDP against one process on the combined
batch. Machinery (references, fit) from ``tests/callbacks/test_targets.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_gp.callbacks import (
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    DataGradientPenalty,
    GradAlign,
    VirtualAdversarialTraining,
)
from tests.callbacks.test_targets import (
    CLASSES,
    LR,
    STEPS,
    VOCAB,
    Parts,
    Problem,
    SGDModule,
    assert_same_training,
    collate,
    fit,
    grad_list,
    ref_data_fd,
    ref_data_penalty,
    ref_fgm,
    ref_freelb,
    ref_grad_align,
    ref_pgd,
    ref_trades,
    ref_trades_awp,
    ref_vat,
    reference,
    token_data,
)

transformers = pytest.importorskip("transformers")

TARGET = "model.bert.embeddings.word_embeddings"


class Bert(SGDModule):
    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=64,
            num_labels=CLASSES, initializer_range=0.2,
            attn_implementation="eager",  # SDPA's CPU kernel has no double backward
        )
        with torch.random.fork_rng():
            torch.manual_seed(5)
            self.model = transformers.BertForSequenceClassification(config)
        self.to(dtype)
        # (perturbed output, clean output, mask) of every pass, when a list; private, so that the callbacks do not put
        # it back after their extra passes as they put back the user's public lists
        self._recorded: list | None = None

    def _recording(self, batch):
        """While a pass runs: a hook registered *inside* the pass, so after the callback's own, that records
        the target's perturbed output next to the clean one (the table's rows)."""
        if self._recorded is None:
            return None
        emb = self.model.bert.embeddings.word_embeddings

        def hook(mod, args, out):
            self._recorded.append((out.detach().clone(), mod.weight[args[0]].detach().clone(),
                                  batch["attention_mask"]))

        return emb.register_forward_hook(hook)

    def logits(self, batch):
        handle = self._recording(batch)
        try:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            if handle is not None:
                handle.remove()

    def training_step(self, batch, batch_idx):
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
        handle = self._recording(batch)
        try:
            return self.model(**batch).loss
        finally:
            if handle is not None:
                handle.remove()

    def on_train_batch_start(self, batch, batch_idx):
        if "index" in batch:
            self.seen.append(batch["index"].clone())


def bert_parts(module: Bert, batch) -> Parts:
    ids, mask, model = batch["input_ids"], batch["attention_mask"], module.model
    return Parts(pre=lambda: model.bert.embeddings.word_embeddings(ids),
                 post=lambda z: model(inputs_embeds=z, attention_mask=mask).logits, mask=mask,
                 labels=batch["labels"])


def indexed_token_data(n: int) -> list[dict]:
    return [dict(s, index=torch.tensor(i)) for i, s in enumerate(token_data(n))]


BERT = Problem(make=Bert, data=token_data, batch=collate, parts=bert_parts, target=TARGET,
               logits_fn=lambda module, batch: module.logits(batch), table=f"{TARGET}.weight")


def bert_cases(module: nn.Module):
    lf = BERT.logits_fn
    return {
        "fgm_half": ([AdversarialTraining(0.5, adversarial_weight=0.5, target=TARGET)], ref_fgm(0.5, 0.5)),
        "fgm_full": ([AdversarialTraining(0.5, target=TARGET)], ref_fgm(0.5, 1.0)),
        "pgd3": ([AdversarialTraining(0.5, steps=3, target=TARGET)], ref_pgd(0.5, 3)),
        "freelb3": ([AdversarialTraining(0.5, steps=3, average_steps=True, target=TARGET)], ref_freelb(0.5, 3)),
        "vat": ([VirtualAdversarialTraining(1.0, xi=1e-3, weight=2.0, target=TARGET, logits_fn=lf)],
                ref_vat(1.0, 2.0, xi=1e-3)),
        "trades": ([TRADES(0.5, 2.0, steps=3, bounds=None, target=TARGET, logits_fn=lf)], ref_trades(0.5, 2.0, 3)),
        "grad_align": ([GradAlign(0.5, 0.3, target=TARGET, method="double_backward")], ref_grad_align(0.5, 0.3)),
        "trades_awp": ([TRADES(0.5, 2.0, steps=3, bounds=None, target=TARGET, logits_fn=lf),
                        AdversarialWeightPerturbation(0.02)], ref_trades_awp(0.5, 2.0, 3, 0.02, module)),
        "data_double_backward": ([DataGradientPenalty(0.05, target=TARGET)], ref_data_penalty(0.05)),
        "data_finite_difference": ([DataGradientPenalty(0.05, target=TARGET, method="finite_difference")],
                                   ref_data_fd(0.05, lambda: list(module.parameters()))),
    }


CASE_NAMES = list(bert_cases(nn.Module()))


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bert_matches_hand_written_loop(name):
    expected = Bert()
    callbacks, objective = bert_cases(expected)[name]
    reference(BERT, objective, module=expected)
    _, got = fit(BERT, callbacks)
    assert_same_training(got, expected, BERT, 1e-9)  # includes: the embedding table trained


@pytest.mark.parametrize("callbacks", [
    lambda: [AdversarialTraining(0.5, adversarial_weight=0.5, target=TARGET)],
    lambda: [AdversarialTraining(0.5, steps=3, target=TARGET)],
    lambda: [AdversarialTraining(0.5, steps=3, average_steps=True, random_start=True, target=TARGET)],
    lambda: [AdversarialTraining(0.5, norm="linf", steps=2, random_start=True, target=TARGET)],
    lambda: [VirtualAdversarialTraining(1.0, target=TARGET, logits_fn=BERT.logits_fn)],
    lambda: [DataGradientPenalty(0.05, target=TARGET, method="finite_difference")],
], ids=["fgm", "pgd", "freelb_random_start", "linf_random_start", "vat", "data_fd"])
def test_padded_positions_are_never_perturbed(callbacks):
    """Every pass's perturbed embedding equals the clean one bitwise at padded positions, and differs at
    real positions in some pass."""
    module = Bert()
    module._recorded = []
    fit(BERT, callbacks(), module=module, steps=1)
    moved = 0
    for out, clean, mask in module._recorded:
        pad = mask == 0
        assert pad.any()
        assert torch.equal(out[pad], clean[pad])
        moved += int(not torch.equal(out[~pad], clean[~pad]))
    assert len(module._recorded) >= 2 and moved >= 1


# ---- DDP ---------------------------------------------------------------------------------------------------

PER_RANK = 3
DDP_CONFIGS = {
    "fgm": lambda: [AdversarialTraining(0.5, adversarial_weight=0.5, target=TARGET)],
    "vat": lambda: [VirtualAdversarialTraining(1.0, xi=1e-3, target=TARGET, logits_fn=BERT.logits_fn)],
}


def ddp_fit(name: str) -> Bert:
    """Default DDP settings (Lightning's shuffling DistributedSampler): the samples each rank saw are recorded."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    module = Bert()
    module.seen = []
    trainer = pl.Trainer(max_steps=STEPS, strategy="ddp", accelerator="cpu", devices=2, precision="64-true",
                         callbacks=DDP_CONFIGS[name](), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(indexed_token_data(2 * PER_RANK * STEPS), batch_size=PER_RANK))
    return trainer, module


def ddp_reference(name: str, seen: list[list[torch.Tensor]], seeds: list[int], ranks=(0, 1)) -> Bert:
    """One process. FGM: on the union of the two ranks' t-th batches (per-sample δ, mean loss). VAT: its
    random directions are seeded by rank, so the one-process reference replays each rank's generator on that
    rank's half (its documented seed: initial seed, rank, step, micro-batch, order) and averages the two
    halves' gradients, which for equal halves is the combined batch's mean objective."""
    module = Bert()
    params = list(module.parameters())
    data = token_data(2 * PER_RANK * STEPS)
    for t in range(STEPS):
        if name == "fgm":
            parts = bert_parts(module, collate(data, torch.cat([seen[0][t], seen[1][t]])))
            grads = grad_list(ref_fgm(0.5, 0.5)(parts, t, 0), params)
        else:
            grads = [torch.zeros_like(p) for p in params]
            for rank in range(2):
                parts = bert_parts(module, collate(data, seen[rank][t]))
                obj = ref_vat(1.0, 1.0, xi=1e-3, rank=ranks[rank], initial_seed=seeds[rank])(parts, t, 0)
                for acc, g in zip(grads, grad_list(obj, params), strict=True):
                    acc += g / 2
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= LR * g
    return module


@pytest.mark.ddp
def test_ddp_matches_one_process(tmp_path):
    from tests.ddp import run_ddp_script

    out = run_ddp_script("targets_ddp.py", tmp_path / "out.pt")
    assert set(out) == set(DDP_CONFIGS)
    for name, result in out.items():
        seen = result["seen"]
        # the default sampler shuffled and split the data: two disjoint halves per step
        for t in range(STEPS):
            both = torch.cat([seen[0][t], seen[1][t]])
            assert len(set(both.tolist())) == 2 * PER_RANK
        expected = ddp_reference(name, seen, result["initial_seed"]).state_dict()
        for key, value in result["params"].items():
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=f"{name} {key}")
        table = f"{TARGET}.weight"
        assert (result["params"][table] - Bert().state_dict()[table]).abs().max() > 1e-4
    if "vat" in out:  # the ranks really drew different directions: rank 0's draws on both halves differ
        seen, seeds = out["vat"]["seen"], out["vat"]["initial_seed"]
        wrong = ddp_reference("vat", seen, seeds, ranks=(0, 0)).state_dict()
        assert max((out["vat"]["params"][k] - v).abs().max() for k, v in wrong.items()) > 1e-6
