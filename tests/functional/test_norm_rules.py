"""The closed-form per-sample norm rules (conv, norm layers, embeddings, attention, tied weights) against
torch.func's per-sample gradients, through `per_sample_grad_norms_by_layer` and the fused monitor."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

from lightning_gp.functional import _norm_rules, _param_units
from lightning_gp.functional.grad_norms import per_sample_grad_norms_by_layer
from lightning_gp.monitors.gradient_norm import GradientNormMonitor
from tests.monitors.support import Classifier, trainer
from tests.monitors.test_fused import Batches

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["float32", "float64"]


def per_sample(out):
    """A nonlinear per-sample value, so that every sample's output gradient differs."""
    return out.reshape(len(out), -1).sin().sum(1)


def reference(model, x, f=per_sample):
    """Per-sample squared norms of each parameter by torch.func (vmap of grad), independent of the recorder."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    g = vmap(grad(lambda p, xi: f(functional_call(model, p, (xi[None],)))[0]), in_dims=(None, 0))(params, x)
    return {k: v.reshape(len(x), -1).square().sum(1) for k, v in g.items()}


def by_layer(ref, keys):
    """Reference parameters summed under the longest layer name that prefixes them (as the rules attribute)."""
    out = dict.fromkeys(keys, 0)
    for name, sq in ref.items():
        owners = [k for k in keys if k == "_root" or name.startswith(k + ".")]
        key = max(owners, key=lambda k: -1 if k == "_root" else len(k))
        out[key] = out[key] + sq
    return out


def check(model, x, dtype=torch.float32, fallbacks=0, monkeypatch=None, f=per_sample):
    """The layer norms match torch.func to 1e-5 relative; ``fallbacks``: how many layers may use torch.func."""
    model = model.to(dtype).eval()
    x = x.to(dtype) if x.is_floating_point() else x
    calls = []
    if monkeypatch is not None:
        fallback = _param_units.replayed_grads
        monkeypatch.setattr(_param_units, "replayed_grads", lambda *a: calls.append(a[0]) or fallback(*a))
    r = per_sample_grad_norms_by_layer(model, x, f)
    ref = reference(model, x, f)
    expected = by_layer(ref, r.layer_squared_norms)
    for k, v in r.layer_squared_norms.items():
        want = torch.zeros_like(v) + expected[k]  # 0 for a layer whose only parameter is tied to an earlier one
        torch.testing.assert_close(v, want, rtol=1e-5 if dtype == torch.float32 else 1e-10, atol=0, msg=k)
    if monkeypatch is not None:
        assert len(calls) == fallbacks, calls
    return r


CONVS = [
    (nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, groups=2, padding_mode="reflect"), (5, 4, 17)),
    (nn.Conv1d(3, 4, 3, padding="same", bias=False), (5, 3, 9)),
    (nn.Conv2d(6, 6, (3, 2), stride=(2, 1), dilation=(1, 2), padding=1, groups=3, padding_mode="circular"),
     (4, 6, 9, 8)),
    (nn.Conv2d(16, 8, 3), (4, 16, 4, 4)),  # L = 4 positions, C·k = 144: the Gram form
    (nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1, groups=2, padding_mode="replicate"), (3, 4, 5, 6, 6)),
    (nn.Conv3d(2, 3, 2, dilation=2, padding="same"), (3, 2, 5, 5, 4)),
    (nn.Conv2d(3, 2, (2, 4), padding="same", padding_mode="reflect"), (3, 3, 6, 7)),  # asymmetric padding
    # stride 1, C_in/G ≥ 8 and many positions: the direct form by kernel offsets, without unfolding
    (nn.Conv1d(8, 4, 3, dilation=2, padding=2, padding_mode="reflect"), (3, 8, 20)),
    (nn.Conv2d(16, 4, (3, 2), padding=1), (3, 16, 9, 7)),
    (nn.Conv3d(16, 4, 2, groups=2, padding=1, dilation=(2, 1, 1), padding_mode="circular"), (2, 16, 4, 5, 5)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("conv,shape", CONVS, ids=lambda c: repr(c) if isinstance(c, nn.Module) else "")
def test_conv(conv, shape, dtype, monkeypatch):
    torch.manual_seed(0)
    check(nn.Sequential(conv, nn.Tanh()), torch.randn(shape), dtype, monkeypatch=monkeypatch)


class ConvTwice(nn.Module):
    """One convolution applied twice: its per-sample gradient is the sum over both calls."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(torch.tanh(self.conv(x)))


@pytest.mark.parametrize("offsets", [False, True])
def test_conv_called_twice(offsets, monkeypatch):
    torch.manual_seed(0)
    used = []
    by_offsets = _norm_rules._conv_by_offsets
    monkeypatch.setattr(_norm_rules, "_conv_by_offsets", lambda *a: used.append(1) or by_offsets(*a))
    conv = nn.Conv2d(8, 8, 3, padding=1) if offsets else nn.Conv2d(4, 4, 3, padding=1, groups=2)
    check(ConvTwice(conv), torch.randn(3, conv.in_channels, 6, 6), torch.float64)
    assert used == ([1] if offsets else [])


def test_conv_with_frozen_weight(monkeypatch):
    conv = nn.Conv2d(8, 4, 3, padding=1)
    conv.weight.requires_grad_(False)  # the bias only: Σ over positions of the output gradient
    r = check(nn.Sequential(conv, nn.Tanh()), torch.randn(3, 8, 5, 5), monkeypatch=monkeypatch)
    assert set(r.layer_squared_norms) == {"0"}


def test_sum_outer_sq_forms_agree():
    h, g = torch.randn(3, 7, 4, dtype=torch.float64), torch.randn(3, 7, 5, dtype=torch.float64)
    direct = torch.einsum("bto,bti->boi", g, h).square().sum((1, 2))
    torch.testing.assert_close(_norm_rules.sum_outer_sq(h, g), direct)  # 7·9 > 2·20: direct
    wide = torch.randn(3, 7, 40, dtype=torch.float64)
    gram = _norm_rules.sum_outer_sq(wide, g)  # 7·45 < 2·200: Gram
    torch.testing.assert_close(gram, torch.einsum("bto,bti->boi", g, wide).square().sum((1, 2)))


NORMS = [
    (nn.LayerNorm(8), (4, 5, 8)),
    (nn.LayerNorm((3, 8), bias=False, eps=1e-3), (4, 2, 3, 8)),
    (nn.GroupNorm(2, 6), (4, 6, 3, 3)),
    (nn.GroupNorm(3, 6, eps=0.1), (4, 6)),
    (nn.RMSNorm(8), (4, 5, 8)),
    (nn.RMSNorm((2, 8), eps=1e-2), (4, 2, 8)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("norm,shape", NORMS, ids=lambda c: repr(c) if isinstance(c, nn.Module) else "")
def test_norm_layers(norm, shape, dtype, monkeypatch):
    torch.manual_seed(0)
    with torch.no_grad():  # away from the initial γ = 1, β = 0
        for p in norm.parameters():
            p.add_(torch.randn_like(p))
    check(nn.Sequential(nn.Tanh(), norm), torch.randn(shape), dtype, monkeypatch=monkeypatch)
    norm.weight.requires_grad_(False)  # a frozen γ: β only (RMSNorm then has no trainable parameter)
    check(nn.Sequential(nn.Tanh(), norm), torch.randn(shape), dtype, monkeypatch=None)


class Tokens(nn.Module):
    """An embedding called twice (two token streams), one with a padding index, and a head."""

    def __init__(self, vocab=7, dim=4, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens):
        e = self.emb(tokens) + 0.5 * self.emb(tokens.flip(1))
        return self.head(torch.tanh(e).mean(1))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("length", [1, 5, 30])  # one position, Gram form, direct (index_add) form
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_with_repeated_tokens(length, padding_idx, dtype, monkeypatch):
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (6, length))  # 7 tokens: many repeats within a sample
    tokens[0] = 2  # a sample made only of the padding token: no gradient at all
    r = check(Tokens(padding_idx=padding_idx), tokens, dtype, monkeypatch=monkeypatch)
    assert (r.layer_squared_norms["emb"][0] == 0) == (padding_idx == 2)


def test_embedding_options_without_closed_form_fall_back(monkeypatch):
    model = Tokens()
    model.emb.scale_grad_by_freq = True  # the batch's token counts scale the gradient
    check(model, torch.randint(0, 7, (4, 5)), fallbacks=1, monkeypatch=monkeypatch)


class Attention(nn.Module):
    def __init__(self, batch_first=True, kdim=None, bias=True, weights=False, masks=False):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, kdim=kdim, vdim=kdim, bias=bias)
        self.kv = nn.Linear(8, kdim or 8)
        self.weights, self.masks = weights, masks

    def forward(self, x):  # x: (B, T, 8)
        kv = torch.tanh(self.kv(x))
        kw = {}
        if self.masks:
            t = x.shape[1]
            kw["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            kw["key_padding_mask"] = torch.zeros(x.shape[:2], dtype=torch.bool)
            kw["key_padding_mask"][:, -1] = True
        if not self.attn.batch_first:
            x, kv = x.transpose(0, 1), kv.transpose(0, 1)
        out, w = self.attn(x, kv, kv, need_weights=self.weights, **kw)
        out = out if self.attn.batch_first else out.transpose(0, 1)
        return out if w is None else out.sum(-1, keepdim=True) * w.sum(-1, keepdim=True) + out


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("options", [{}, {"batch_first": False}, {"kdim": 6}, {"weights": True, "masks": True},
                                     {"batch_first": False, "kdim": 5, "bias": False}], ids=str)
def test_multihead_attention(options, dtype, monkeypatch):
    torch.manual_seed(0)
    r = check(Attention(**options), torch.randn(3, 4, 8), dtype, monkeypatch=monkeypatch)
    assert set(r.layer_squared_norms) == {"attn", "kv"}  # out_proj's weights are the attention's


def test_transformer_encoder_layer(monkeypatch):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    check(layer, torch.randn(3, 5, 8), monkeypatch=monkeypatch)


class Bert(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=32, attn_implementation="eager")
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids):
        return self.bert(input_ids=ids).logits


def test_tiny_bert(monkeypatch):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 12))
    ids[:, 3] = ids[:, 7]  # repeated tokens
    # The position embeddings are looked up once for the batch ((1, T)) and broadcast: the recorder expands the
    # lookup to the batch, so they take the Embedding closed form like every other layer (no torch.func).
    r = check(Bert(), ids, monkeypatch=monkeypatch, fallbacks=0)
    assert "bert.bert.embeddings.position_embeddings" in r.layer_squared_norms


class Tied(nn.Module):
    """A language-model head tied to the input embedding, and a Linear layer tied to another."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Embedding(9, 6)
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.decoder = nn.Linear(6, 9)
        self.decoder.weight = self.encoder.weight

    def forward(self, tokens):
        h = torch.tanh(self.b(torch.tanh(self.a(self.encoder(tokens)))))
        return self.decoder(h).mean(1)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_tied_weights(dtype, padding_idx, monkeypatch):
    torch.manual_seed(0)
    model, tokens = Tied(), torch.randint(0, 9, (5, 4))
    model.encoder.padding_idx = padding_idx
    tokens[:, 1] = tokens[:, 2]  # repeated tokens
    tied = ["encoder.weight", "a.weight", "a.bias", "b.bias", "decoder.bias"]
    assert [k for k, _ in model.named_parameters()] == tied
    r = check(model, tokens, dtype, monkeypatch=monkeypatch)  # torch.func's reference sees each tied parameter once
    # the shared weight is attributed to its first user in named_modules() order, its bias to its own layer
    assert set(r.layer_squared_norms) == {"encoder", "a", "b", "decoder"}


class Scale(nn.Module):
    """A layer without a closed form, here sharing its weight with a Linear layer."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight

    def forward(self, x):
        return x @ self.weight.T * 0.5


class TiedWithCustom(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.custom = Scale(self.lin.weight)

    def forward(self, x):
        return self.custom(torch.tanh(self.lin(x)))


def test_tied_with_a_layer_without_closed_form_sums_per_sample_gradients(monkeypatch):
    r = check(TiedWithCustom(), torch.randn(4, 3, 5), torch.float64, fallbacks=2, monkeypatch=monkeypatch)
    assert set(r.layer_squared_norms) == {"lin", "custom"}


class Doubled(nn.Linear):
    """A Linear subclass with its own forward: no closed form applies (types match exactly)."""

    def forward(self, x):
        return 2 * super().forward(x) + self.weight.sum()


def test_subclasses_with_their_own_forward_fall_back(monkeypatch):
    check(nn.Sequential(Doubled(4, 3), nn.Tanh()), torch.randn(5, 4), fallbacks=1, monkeypatch=monkeypatch)


# ---- the fused monitor, in a real Trainer.fit ----


class CNN(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(4, 4, 3, stride=2, groups=2, padding=1), nn.Flatten(), nn.Linear(16, 3))


class TokenModel(Classifier):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(Tied(), nn.LayerNorm(9), nn.Linear(9, 3))


@pytest.mark.parametrize("kind", ["cnn", "tokens"])
def test_fused_monitor_uses_the_rules(kind, monkeypatch):
    torch.manual_seed(0)
    calls = []
    fallback = _param_units.replayed_grads
    monkeypatch.setattr(_param_units, "replayed_grads", lambda *a: calls.append(a[0]) or fallback(*a))
    if kind == "cnn":
        module, x = CNN(), torch.randn(8, 2, 8, 8)
    else:
        module, x = TokenModel(), torch.randint(0, 9, (8, 5))
    y = torch.randint(0, 3, (8,))
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    trainer(None, callbacks=[fused, snap], max_steps=1).fit(module, DataLoader(TensorDataset(x, y), batch_size=8))
    model = snap.model.eval()
    params = {k: p.detach() for k, p in model.named_parameters()}
    g = vmap(grad(lambda p, xi, yi: F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])),
             in_dims=(None, 0, 0))(params, x, y)
    sq = {k: v.reshape(8, -1).square().sum(1) for k, v in g.items()}
    layers = {k.removeprefix("grad_norm/layer/"): v for k, v in fused.last_logged.items() if "/layer/" in k}
    expected = by_layer(sq, layers)
    assert layers == pytest.approx({k: float(v.sqrt().mean()) for k, v in expected.items()}, rel=1e-5)
    total = sum(sq.values()).sqrt()
    assert fused.last_logged["grad_norm/param_per_sample_max"] == pytest.approx(float(total.max()), rel=1e-5)
    assert calls == []  # tied weights included: the Gram form over the calls of all their users


class AttentionTokens(Classifier):
    """Embedding, MultiheadAttention and LayerNorm: every layer with a closed form, none of them Linear only."""

    def __init__(self):
        super().__init__()
        self.net = nn.ModuleDict({"emb": nn.Embedding(9, 8), "attn": nn.MultiheadAttention(8, 2, batch_first=True),
                                  "norm": nn.LayerNorm(8), "head": nn.Linear(8, 3)})

    def forward(self, tokens):
        e = self.net["emb"](tokens)
        a = self.net["attn"](e, e, e, need_weights=False)[0]
        return self.net["head"](self.net["norm"](e + a).mean(1))


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fused_half_precision_records_are_measured_in_float32(precision):
    def run(precision):
        torch.manual_seed(0)
        x, y = torch.randint(0, 9, (8, 5)), torch.randint(0, 3, (8,))
        monitor = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused")
        trainer(None, callbacks=[monitor], max_steps=1, precision=precision).fit(
            AttentionTokens(), DataLoader(TensorDataset(x, y), batch_size=8))
        return {k: v for k, v in monitor.last_logged.items() if "/layer/" in k or "param_per_sample" in k}

    full, half = run("32-true"), run(precision)
    assert set(full) == {*(f"grad_norm/layer/net.{k}" for k in ("emb", "attn", "norm", "head")),
                         "grad_norm/param_per_sample_mean", "grad_norm/param_per_sample_max"}
    assert half == pytest.approx(full, rel=5e-2)


class UsedOutside(nn.Module):
    """A Linear layer whose weights the parent uses without calling it: every module must then be recorded."""

    def __init__(self):
        super().__init__()
        self.first, self.norm, self.head = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.norm(F.linear(x, self.first.weight, self.first.bias)))


def test_parameters_used_outside_their_layer_are_measured_through_the_parent(monkeypatch):
    r = check(UsedOutside(), torch.randn(5, 4), fallbacks=1, monkeypatch=monkeypatch)
    assert set(r.layer_squared_norms) == {"_root", "norm", "head"}  # the root replays `first` by torch.func


class TiedMLP(Classifier):
    """An MLP whose two hidden Linear layers share their weight (not their bias)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(),
                                 nn.Linear(8, 3))
        self.net[4].weight = self.net[2].weight


def test_fused_tied_linear_weights_match_torch_func():
    from tests.monitors.support import loader, reference_norms

    torch.manual_seed(0)
    fused, snap = GradientNormMonitor(per_layer=True, every_n_steps=1, histograms=False, mode="fused"), Batches(0)
    trainer(None, callbacks=[fused, snap], max_steps=1).fit(TiedMLP(), loader())
    (x, y), = snap.batches
    ref = reference_norms(snap.model, x, y)  # torch.func sees the tied weight once, as net.2.weight
    for layer in ("net.0", "net.2", "net.4", "net.6"):  # net.4: its bias only; the tied weight is net.2's
        assert fused.last_logged[f"grad_norm/layer/{layer}"] == pytest.approx(float(ref[f"layer/{layer}"].mean()),
                                                                             rel=1e-5)
    assert fused.last_logged["grad_norm/param_per_sample_max"] == pytest.approx(float(ref["param"].max()), rel=1e-5)
