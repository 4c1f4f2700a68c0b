import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_gp.functional.grad_norms import (
    GradNormRecorder,
    linear_squared_norms,
    per_sample_grad_norms,
    per_sample_grad_norms_by_layer,
)
from tests.integration.test_layer_zoo import loop

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def reference(model, x, y):
    """Per-sample ‖∇ₓℓᵢ‖, ‖∇θℓᵢ‖ and per-module squared norms by torch.func vmap + grad."""
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if x.is_floating_point():
        dp, dx = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, x, y)
    else:  # token ids have no gradient
        dp, dx = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y), None
    sq = {k: v.reshape(len(x), -1).square().sum(1) for k, v in dp.items()}
    input_norms = dx.reshape(len(x), -1).norm(dim=1) if dx is not None else None
    return input_norms, sum(sq.values()).sqrt(), sq


def ce(y):
    return lambda out: F.cross_entropy(out, y, reduction="none")


def assert_matches(model, x, classes=3):
    y = torch.randint(0, classes, (len(x),))
    r = per_sample_grad_norms_by_layer(model, x, ce(y))
    ref_in, ref_param, ref_sq = reference(model, x, y)
    torch.testing.assert_close(r.param_norms, ref_param, rtol=1e-5, atol=0)
    if ref_in is not None:
        torch.testing.assert_close(r.input_norms, ref_in, rtol=1e-5, atol=0)
    torch.testing.assert_close(r.values, F.cross_entropy(model(x), y, reduction="none"))
    return r, ref_sq


class Block(nn.Module):
    """Pre-norm Transformer block: attention + GELU MLP, LayerNorms, then a mean-pooled head."""

    def __init__(self, d=16, heads=4, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(d, 32), nn.GELU(), nn.Linear(32, d))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        y = self.ln1(x)
        a = self.attn(y, y, y, need_weights=False)[0] if self.batch_first else None
        if a is None:  # (T, B, d) layout for the attention only
            yt = y.transpose(0, 1)
            a = self.attn(yt, yt, yt, need_weights=False)[0].transpose(0, 1)
        x = x + a
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(1))


def test_mlp_matches_torch_func():
    model = nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 6, bias=False), nn.Tanh(), nn.Linear(6, 3)
    )
    model[4].bias.requires_grad_(False)  # frozen parameters are not part of θ
    r, ref_sq = assert_matches(model, torch.randn(8, 5))
    torch.testing.assert_close(r.layer_squared_norms["0"], ref_sq["0.weight"] + ref_sq["0.bias"])
    torch.testing.assert_close(r.layer_squared_norms["4"], ref_sq["4.weight"])
    assert sorted(r.layer_squared_norms) == ["0", "2", "4"]


def test_cnn_matches_torch_func():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode="circular", dilation=1),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(6, 3),
    )
    assert_matches(model, torch.randn(5, 2, 8, 8))


def test_conv1d_same_padding_and_dilation():
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding="same", dilation=2), nn.Tanh(), nn.Flatten(), nn.Linear(40, 3))
    assert_matches(model, torch.randn(4, 3, 10))


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_block_matches_torch_func(batch_first):
    r, ref_sq = assert_matches(Block(batch_first=batch_first), torch.randn(4, 5, 16))
    # out_proj's weights are used inside MultiheadAttention.forward, not by out_proj itself: they are
    # attributed to the attention layer, whose per-sample gradient comes from torch.func.
    attn = sum(v for k, v in ref_sq.items() if k.startswith("attn."))
    torch.testing.assert_close(r.layer_squared_norms["attn"], attn, rtol=1e-5, atol=0)
    assert set(r.layer_squared_norms) == {"ln1", "ln2", "attn", "mlp.0", "mlp.2", "head"}


def test_sequence_linear_both_forms_and_shared_layer():
    class Twice(nn.Module):  # one Linear called twice, on a sequence: gradients of both uses add up
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.wide = nn.Linear(4, 64)  # T² < d_in·d_out: Gram form; the narrow one uses the explicit form
            self.head = nn.Linear(64, 3)

        def forward(self, x):
            return self.head(self.wide(self.lin(torch.tanh(self.lin(x)))).mean(1))

    assert_matches(Twice(), torch.randn(4, 6, 4))


def test_embedding_with_token_inputs_has_nan_input_norms():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Flatten(), nn.Linear(24, 3))
    tokens = torch.randint(0, 10, (5, 3))
    r, _ = assert_matches(model, tokens)
    assert torch.isnan(r.input_norms).all()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_matches_backpack_batch_l2():
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 16),
        nn.Sigmoid(), nn.Linear(16, 4),
    )  # fmt: skip
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    r = per_sample_grad_norms_by_layer(model, x, ce(y))
    bp = extend(copy.deepcopy(model))
    loss = extend(nn.CrossEntropyLoss(reduction="sum"))(bp(x), y)
    with backpack(BatchL2Grad()):
        loss.backward()
    for name, mod in bp.named_children():
        if any(True for _ in mod.parameters()):
            torch.testing.assert_close(
                r.layer_squared_norms[name], mod.weight.batch_l2 + mod.bias.batch_l2, rtol=1e-5, atol=1e-7
            )


def test_recorder_piggybacks_on_a_training_step_without_changing_it():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    twin = copy.deepcopy(model)
    x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))
    ref = per_sample_grad_norms_by_layer(model, x, ce(y)).layer_squared_norms
    for net, record in ((model, True), (twin, False)):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        rec = GradNormRecorder(net)
        if record:
            rec.start()
        with torch.no_grad():
            net(x)  # an evaluation forward in between is ignored
        F.cross_entropy(net(x), y).backward()  # mean over the batch: gradients carry a 1/B
        rec.stop()
        opt.step()
        if record:
            got = rec.layer_squared_norms(6)
            for k in ref:
                torch.testing.assert_close(got[k] * 6**2, ref[k], rtol=1e-5, atol=0)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(not m._forward_hooks for m in model.modules())


def test_linear_squared_norms_sequence_forms_agree():
    h, g = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    explicit = torch.einsum("bto,bti->boi", g, h).square().sum((1, 2)) + g.sum(1).square().sum(1)
    torch.testing.assert_close(linear_squared_norms(h, g), explicit)
    torch.testing.assert_close(linear_squared_norms(h, g, bias=False, weight=False), torch.zeros(3))


def test_leaves_nothing_behind_also_when_loss_fn_raises():
    model = Block()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    x = torch.randn(3, 5, 16)

    def boom(out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        per_sample_grad_norms(model, x, boom)
    input_norms, param_norms = per_sample_grad_norms(model, x, lambda out: out.sum(1))
    assert input_norms.shape == param_norms.shape == (3,)
    for mod in model.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks and not mod._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert not x.requires_grad
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_errors():
    x = torch.randn(4, 3)
    bn = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\) is in training mode"):
        per_sample_grad_norms(bn, x, lambda out: out.sum(1))
    bn.eval()  # eval-mode BatchNorm is a per-sample affine map: fine
    assert per_sample_grad_norms(bn, x, lambda out: out.sum(1))[1].shape == (4,)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(4,\)"):
        per_sample_grad_norms(nn.Linear(3, 2), x, lambda out: out)
    with pytest.raises(ValueError, match="no autograd graph"):
        per_sample_grad_norms(nn.Linear(3, 2), x, lambda out: out.detach().sum(1))
    with pytest.raises(ValueError, match="leading batch dimension"):
        per_sample_grad_norms(nn.Linear(3, 2), torch.tensor(1.0), lambda out: out)
    with pytest.raises(RuntimeError, match="in place"):
        per_sample_grad_norms(InPlaceInput(), x, lambda out: out.sum(1))


@pytest.mark.parametrize("batch", [4, 5])  # 5: the sequence is as long as the batch
def test_batch_second_data_is_measured_exactly(batch):
    """A (T, B, d) layout on a plain Linear: the samples are in dimension 1. Read from autograd (the last
    sample's gradient spills outside row B − 1), not from the sizes: T == B must not decide it."""
    torch.manual_seed(0)
    model = nn.Sequential(SwapBatch(), nn.Linear(3, 2)).double()
    x = torch.randn(batch, 5, 3, dtype=torch.float64)
    f = lambda out: out.transpose(0, 1).sum((1, 2))  # noqa: E731
    torch.testing.assert_close(per_sample_grad_norms(model, x, f)[1], loop(model, x, f), rtol=1e-10, atol=0)


def test_train_mode_attention_dropout_is_measured_with_the_pass_s_own_masks():
    """Dropout inside MultiheadAttention: torch.func cannot replay it, the batched backward takes the masks the
    forward drew; against the same forward's gradient of each sample (a fixed seed for both)."""
    model = Block().double()
    model.attn.dropout = 0.5
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    torch.manual_seed(7)
    _, got = per_sample_grad_norms(model, x, lambda out: out.sum(1))
    torch.manual_seed(7)
    values = model(x).sum(1)
    params = list(model.parameters())
    want = torch.stack([torch.sqrt(sum(g.square().sum() for g in torch.autograd.grad(values[i], params,
                        retain_graph=True, allow_unused=True) if g is not None)) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


class SwapBatch(nn.Module):
    def forward(self, x):
        return x.transpose(0, 1)


class Bias(nn.Module):
    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(3))

    def forward(self, y):
        return y + self.b


class InPlaceInput(nn.Module):
    """Overwrites the input of a layer after the layer ran, so the recorded input would be stale."""

    def __init__(self):
        super().__init__()
        self.bias = Bias()

    def forward(self, x):
        y = x * 2.0
        out = self.bias(y)
        y.add_(1.0)  # autograd allows it (y + b does not save y); our record of the input must notice
        return out * y


def test_input_norms_false_skips_the_input_gradient_and_keeps_the_parameter_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    x = torch.randn(5, 3, 6, 6)
    y = torch.randint(0, 2, (5,))

    def loss_fn(out):
        return nn.functional.cross_entropy(out, y, reduction="none")

    gx, gt = per_sample_grad_norms(model, x, loss_fn)
    nx, nt = per_sample_grad_norms(model, x, loss_fn, input_norms=False)
    assert gx.isfinite().all() and nx.isnan().all()
    torch.testing.assert_close(nt, gt)
    assert not x.requires_grad and x.grad is None
    with pytest.raises(TypeError, match="`input_norms` must be True or False, got str"):
        per_sample_grad_norms(model, x, loss_fn, input_norms="no")


def test_per_sample_norms_of_a_scalar_loss_equal_those_of_per_sample_values():
    """The scalar-loss route (what the monitors use on `training_step`) against the per-sample route, for a mean
    and a sum, with ∇ w.r.t. the input; its errors name the argument."""
    from lightning_gp.functional import per_sample_grad_norms_by_layer, per_sample_grad_norms_of_loss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 3)).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    ref = per_sample_grad_norms_by_layer(model, x, lambda out: F.cross_entropy(out, y, reduction="none"))
    for reduction in ("mean", "sum"):
        leaf = x.clone().requires_grad_(True)
        got = per_sample_grad_norms_of_loss(
            model, lambda leaf=leaf, reduction=reduction: F.cross_entropy(model(leaf), y, reduction=reduction),
            7, wrt=leaf, reduction=reduction)
        torch.testing.assert_close(got.param_norms, ref.param_norms, rtol=1e-12, atol=0)
        torch.testing.assert_close(got.input_norms, ref.input_norms, rtol=1e-12, atol=0)
        assert got.layer_squared_norms.keys() == ref.layer_squared_norms.keys()
    with pytest.raises(ValueError, match=r"`loss_fn\(\)` must return the batch's scalar loss.*shape \[7\]"):
        per_sample_grad_norms_of_loss(model, lambda: F.cross_entropy(model(x), y, reduction="none"), 7)
    with pytest.raises(ValueError, match=r"does not depend on `wrt`"):
        per_sample_grad_norms_of_loss(model, lambda: F.cross_entropy(model(x), y), 7,
                                      wrt=torch.zeros(7, 4, requires_grad=True))
    with pytest.raises(ValueError, match=r"`reduction` must be one of \['mean', 'sum'\], got 'avg'"):
        per_sample_grad_norms_of_loss(model, lambda: F.cross_entropy(model(x), y), 7, reduction="avg")


class FedByAParameter(nn.Module):
    """A layer whose input is a parameter (a learned query), off the way back from the loss to the batch's input
    and to the first layers: a backward to those alone never reaches it."""

    def __init__(self):
        super().__init__()
        self.query = nn.Parameter(torch.randn(4, 6))
        self.q_proj = nn.Linear(6, 6)
        self.embed = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # x: (B, T, 5)
        h = self.embed(x)  # (B, T, 6)
        q = self.q_proj(self.query)  # (4, 6): shared by the samples
        attn = torch.softmax(h @ q.T, dim=-1) @ q  # (B, T, 6)
        return self.head((h + attn).mean(1))


@pytest.mark.parametrize("input_norms", [True, False])
def test_a_layer_off_the_way_back_to_the_input_is_measured_on_every_call(input_norms):
    """The backward targets x and the first layers' outputs: a layer fed by a parameter is not on the way back to
    them. Its norms are right on the first call (a second backward reaches it) and on the next ones (every layer
    output a target from then on)."""
    torch.manual_seed(0)
    model = FedByAParameter().double()
    x = torch.randn(5, 7, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    _, want, _ = reference(model, x, y)
    for _ in range(3):
        _, got = per_sample_grad_norms(model, x, ce(y), input_norms=input_norms)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)


def test_the_recorder_measures_layers_in_the_backward_and_drops_their_records():
    """With compute_eagerly, each eligible layer's norms are taken as its gradients arrive and its activations are
    let go then; the norms equal those taken after the backward from the kept records."""
    torch.manual_seed(0)
    model = Block().double().eval()
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    results = []
    for eager in (False, True):
        rec = GradNormRecorder(model, 4).start()
        if eager:
            rec.compute_eagerly(4)
        model(x).sum().backward()
        rec.stop()
        if eager:  # the Linear and LayerNorm layers; not the attention (its out_proj is a child with parameters)
            assert {"mlp.0", "mlp.2", "ln1", "ln2", "head"} <= set(rec.eager_norms)
            assert "attn" not in rec.eager_norms
            assert rec.calls("mlp.0")[0].args == () and rec.calls("mlp.0")[0].grads == {}
        results.append(rec.layer_squared_norms(4))
        model.zero_grad()
    assert list(results[0]) == list(results[1])  # the same layers, in the model's order
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-12, atol=0)


def test_a_known_structure_keeps_no_layer_output_but_the_sources():
    """On a call whose structure is known, the recorder keeps no reference to the outputs of the layers measured in
    the backward (but the first layers', the backward's targets), so outputs no later op saves are freed in the
    forward; the norms are the same."""
    torch.manual_seed(0)
    model = Block().double().eval()
    x = torch.randn(4, 6, 16, dtype=torch.float64)
    rec = GradNormRecorder(model, 4).start()
    rec.keep_outputs_of_sources_only()
    rec.compute_eagerly(4)
    values = model(x).sum(1)
    assert rec.calls("ln1")[0].outputs[0] is not None  # fed by x, which does not require grad: a source
    assert rec.calls("mlp.0")[0].outputs == [None] and rec.calls("head")[0].output is None
    torch.autograd.grad(values.sum(), rec.source_outputs())
    rec.stop()
    got = rec.layer_squared_norms(4)
    want = per_sample_grad_norms_by_layer(model, x, lambda out: out.sum(1)).layer_squared_norms
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=0)
