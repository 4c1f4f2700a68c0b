"""Every torch.nn layer with parameters: per-sample ‖∇θℓᵢ‖ against a loop over samples (a batch of one each).

Arguments drawn by hypothesis; B = 1 and B equal to the sequence length among them (a shape coincidence must
not decide which dimension holds the samples). float64 and float32, both against a float64 loop on the same
weights. Layers without a closed form, recurrent layers, batch-second layouts and packed sequences go through
the exact batched backward; the test holds every route to the same answer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_gp.functional import per_sample_grad_norms


class Wrap(nn.Module):
    """A layer as a model from a batch-first input to one output tensor (the batch moved where the layer wants)."""

    def __init__(self, layer: nn.Module, batch_dim: int = 0, extra=None, pack: bool = False) -> None:
        super().__init__()
        self.layer, self.batch_dim, self.extra, self.pack = layer, batch_dim, extra, pack

    def forward(self, x):
        if self.batch_dim == 1:
            x = x.transpose(0, 1)
        if self.pack:
            first = self.layer.batch_first
            lengths = torch.full((x.shape[0 if first else 1],), x.shape[1 if first else 0])
            x = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=first)
        out = self.layer(x) if self.extra is None else self.extra(self.layer, x)
        if isinstance(out, tuple):
            out = out[0]
        if self.pack:
            out = nn.utils.rnn.pad_packed_sequence(out, batch_first=self.layer.batch_first)[0]
        if self.batch_dim == 1 and out.ndim >= 2:
            out = out.transpose(0, 1)
        return out


def values(out: torch.Tensor) -> torch.Tensor:
    """A per-sample value that weighs every output coordinate differently (so no symmetry hides an error)."""
    w = torch.linspace(0.5, 1.5, out[0].numel(), dtype=out.dtype).reshape(out.shape[1:])
    return (torch.tanh(out) * w).flatten(1).sum(1)


def loop(model: nn.Module, x: torch.Tensor, f=values) -> torch.Tensor:
    """The reference: each sample alone (a batch of one), the norm of its whole gradient."""
    params = [p for p in model.parameters() if p.requires_grad]
    out = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(f(model(x[i:i + 1]))[0], params, allow_unused=True)
        out.append(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))
    return torch.stack(out)


def check(model: nn.Module, x: torch.Tensor, dtype: torch.dtype, seq: int = 1) -> None:
    model64 = copy.deepcopy(model).double()
    want = loop(model64, x.double() if x.is_floating_point() else x)
    model = model.to(dtype)
    # float32: each norm sums O(seq · width) products of rounded terms; 64·seq·ε bounds it (float64: 1e-9).
    rtol = 1e-9 if dtype == torch.float64 else 64 * seq * torch.finfo(torch.float32).eps * 10
    # the first call probes the model's structure; the second, knowing it, measures each layer in the backward
    for _ in range(2):
        _, got = per_sample_grad_norms(model, x.to(dtype) if x.is_floating_point() else x, values,
                                       input_norms=False)
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * float(want.abs().max()))


DTYPES = st.sampled_from([torch.float64, torch.float32])


@st.composite
def batch_and_length(draw):
    length = draw(st.integers(2, 6))
    batch = draw(st.sampled_from([1, length, draw(st.integers(2, 5))]))  # B = 1, B = T, another
    return batch, length


SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@SETTINGS
@given(bl=batch_and_length(), d_in=st.integers(1, 5), d_out=st.integers(1, 5), bias=st.booleans(), dtype=DTYPES,
       batch_second=st.booleans())
def test_linear(bl, d_in, d_out, bias, dtype, batch_second):
    b, t = bl
    torch.manual_seed(0)
    model = Wrap(nn.Linear(d_in, d_out, bias=bias), batch_dim=1 if batch_second else 0)
    check(model, torch.randn(b, t, d_in), dtype, t)


@SETTINGS
@given(bl=batch_and_length(), dtype=DTYPES, bias=st.booleans())
def test_bilinear(bl, dtype, bias):
    b, t = bl
    torch.manual_seed(0)
    model = Wrap(nn.Bilinear(3, 3, 2, bias=bias), extra=lambda layer, x: layer(x, x.flip(-1)))
    check(model, torch.randn(b, t, 3), dtype, t)


@SETTINGS
@given(bl=batch_and_length(), dims=st.sampled_from([1, 2, 3]), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       groups=st.sampled_from([1, 2]), padding_mode=st.sampled_from(["zeros", "reflect", "circular", "replicate"]),
       transposed=st.booleans(), dtype=DTYPES)
def test_convolutions(bl, dims, stride, dilation, groups, padding_mode, transposed, dtype):
    b, t = bl
    size = t + 1  # short spatial dimensions (2–7) with padding 1: reflect needs padding < size
    torch.manual_seed(0)
    if transposed:
        cls = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        layer = cls(2 * groups, 2 * groups, 2, stride=stride, dilation=dilation, groups=groups, padding=0)
    else:
        cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        layer = cls(2 * groups, 2 * groups, 2, stride=stride, dilation=dilation, groups=groups, padding=1,
                    padding_mode=padding_mode)
    check(Wrap(layer), torch.randn(b, 2 * groups, *([size] * dims)), dtype, size ** dims)


@SETTINGS
@given(bl=batch_and_length(), padding_idx=st.sampled_from([None, 0]), max_norm=st.sampled_from([None, 1.0]),
       dtype=DTYPES)
def test_embedding(bl, padding_idx, max_norm, dtype):
    b, t = bl
    torch.manual_seed(0)
    layer = nn.Embedding(7, 3, padding_idx=padding_idx, max_norm=max_norm)
    ids = torch.randint(0, 7, (b, t))
    ids[:, 0] = ids[:, -1]  # a repeated token in every sample
    check(Wrap(layer), ids, dtype, t)


@SETTINGS
@given(bl=batch_and_length(), mode=st.sampled_from(["sum", "mean", "max"]), flat=st.booleans(), dtype=DTYPES)
def test_embedding_bag(bl, mode, flat, dtype):
    b, t = bl
    torch.manual_seed(0)
    layer = nn.EmbeddingBag(7, 3, mode=mode)
    ids = torch.randint(0, 7, (b, t))
    if flat:  # 1-D ids with offsets, one bag per sample
        extra = lambda layer, x: layer(x.reshape(-1), torch.arange(0, x.numel(), x.shape[1]))  # noqa: E731
        check(Wrap(layer, extra=extra), ids, dtype, t)
    else:
        check(Wrap(layer), ids, dtype, t)


NORMS = [
    lambda c: nn.LayerNorm(c),
    lambda c: nn.GroupNorm(2, c),
    lambda c: nn.RMSNorm(c),
    lambda c: nn.InstanceNorm1d(c, affine=True),
    lambda c: nn.InstanceNorm1d(c, affine=True, track_running_stats=True),  # train mode: running stats move
    lambda c: nn.BatchNorm1d(c).eval(),  # eval mode: a per-sample affine map
]


@SETTINGS
@given(bl=batch_and_length(), which=st.integers(0, len(NORMS) - 1), dtype=DTYPES)
def test_norm_layers(bl, which, dtype):
    b, t = bl
    torch.manual_seed(0)
    layer = NORMS[which](4)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape))
    x = torch.randn(b, t, 4)
    extra = None if which in (0, 2) else (lambda layer, x: layer(x.transpose(1, 2)).transpose(1, 2))
    check(Wrap(layer, extra=extra), x, dtype, t)


@SETTINGS
@given(bl=batch_and_length(), cls=st.sampled_from([nn.RNN, nn.GRU, nn.LSTM]), batch_first=st.booleans(),
       layers=st.integers(1, 2), bidirectional=st.booleans(), pack=st.booleans(), dtype=DTYPES)
def test_recurrent(bl, cls, batch_first, layers, bidirectional, pack, dtype):
    b, t = bl
    torch.manual_seed(0)
    layer = cls(3, 4, num_layers=layers, batch_first=batch_first, bidirectional=bidirectional)
    model = Wrap(layer, batch_dim=0 if batch_first else 1, pack=pack)
    check(model, torch.randn(b, t, 3), dtype, t)


@SETTINGS
@given(bl=batch_and_length(), batch_first=st.booleans(), weights=st.booleans(), kdim=st.booleans(), dtype=DTYPES)
def test_multihead_attention(bl, batch_first, weights, kdim, dtype):
    b, t = bl
    torch.manual_seed(0)
    layer = nn.MultiheadAttention(4, 2, batch_first=batch_first, kdim=3 if kdim else None, vdim=3 if kdim else None)

    def extra(layer, x):
        kv = x[..., :3] if kdim else x
        out, attn = layer(x, kv, kv, need_weights=weights)
        if weights:  # the (B, T, S) weights reach the loss too, whatever the layout of the output
            attn = attn if batch_first else attn.transpose(0, 1)
            return out + attn.sum(-1, keepdim=True)
        return out

    check(Wrap(layer, batch_dim=0 if batch_first else 1, extra=extra), torch.randn(b, t, 4), dtype, t)


@SETTINGS
@given(bl=batch_and_length(), batch_first=st.booleans(), decoder=st.booleans(), norm_first=st.booleans(),
       dtype=DTYPES)
def test_transformer_layers(bl, batch_first, decoder, norm_first, dtype):
    b, t = bl
    torch.manual_seed(0)
    kw = dict(dim_feedforward=8, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    if decoder:
        layer = nn.TransformerDecoderLayer(4, 2, **kw)
        extra = lambda layer, x: layer(x, x.flip(0 if not batch_first else 1))  # noqa: E731
    else:
        layer, extra = nn.TransformerEncoderLayer(4, 2, **kw), None
    check(Wrap(layer, batch_dim=0 if batch_first else 1, extra=extra), torch.randn(b, t, 4), dtype, t)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prelu_and_parameters_of_a_custom_module(dtype):
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.linspace(0.5, 1.5, 3))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), Scale())
    check(model, torch.randn(4, 3), dtype, 1)
