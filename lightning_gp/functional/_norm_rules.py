"""Closed-form per-sample squared gradient norms of common layers, from a layer's recorded inputs and output
gradients (no per-sample gradient of the whole model, no ``torch.func``).

Each rule gets the layer, its recorded calls and the names of its trainable parameters, and returns the
per-sample Σ over those parameters of ‖∇fᵢ‖², shape (B,). Where a per-sample gradient is a sum over positions
t of outer products gₜhₜᵀ, the rule picks the cheaper of two exact forms from the shapes: the direct form
builds the (b × a) gradient per sample (cost T·a·b), the Gram form Σₜ,ₛ (gₜ·gₛ)(hₜ·hₛ) never does (cost
T²·(a + b)); choosing per layer is the "mixed ghost norm" of Bu et al. (2022, "Scalable and efficient
training of large convolutional neural networks with differential privacy"). Several calls of a layer add
their gradients, so their positions are concatenated.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._sharded import layer_type
from lightning_gp.functional._torch_private import qkv_same_embed_dim, reversed_padding

LINEAR_LAYERS = (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear)  # the latter: attention's out_proj
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
MHA_PARAMS = {"in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight",
              "out_proj.weight", "out_proj.bias"}  # fmt: skip


def row_sq(t: Tensor) -> Tensor:
    """Σ of squares over the last dimension; ``vector_norm`` reads each row once and allocates no
    temporary of ``t``'s size."""
    if t.requires_grad and torch.is_grad_enabled():
        return t.square().sum(-1)  # differentiable everywhere; ‖t‖² via the norm has a NaN gradient at t = 0
    return torch.linalg.vector_norm(t, dim=-1).square()


def sample_sq(t: Tensor) -> Tensor:
    """Σ of squares per sample of a (B, ...) tensor."""
    return row_sq(t.reshape(t.shape[0], -1))


def sum_over_sequence(g: Tensor) -> Tensor:
    """Σₜ gₜ of g (N, T, b): the bias gradient; a view, not a copy, when T = 1."""
    return g[:, 0] if g.shape[1] == 1 else g.sum(1)


def sum_outer_sq(h: Tensor, g: Tensor) -> Tensor:
    """‖Σₜ gₜ hₜᵀ‖²_F per row of h (N, T, a) and g (N, T, b), the cheaper of Gram and direct form.

    Transposed views (the (N, a, T) layout of unfolded convolutions passed as ``.mT``) are read in place.
    """
    if h.shape[1] == 1:
        return row_sq(h[:, 0]) * row_sq(g[:, 0])
    t, a, b = h.shape[1], h.shape[2], g.shape[2]
    if t * t * (a + b) <= 2 * t * a * b:
        # Σₜ,ₛ (gₜ·gₛ)(hₜ·hₛ): the Gram form, never builds the (a × b) gradient.
        return (torch.bmm(h, h.mT) * torch.bmm(g, g.mT)).sum((1, 2))
    return sample_sq(torch.bmm(g.mT, h))


def linear_sq(h: Tensor, g: Tensor, weight: bool, bias: bool) -> Tensor:
    """‖∇_W‖² + ‖∇_b‖² per row of a Linear layer's input h (N, T, a) and output gradient g (N, T, b)."""
    out = torch.zeros(h.shape[0], dtype=g.dtype, device=g.device)
    if weight:
        out = out + sum_outer_sq(h, g)
    if bias:
        out = out + row_sq(sum_over_sequence(g))
    return out


def _cat(ts: list[Tensor], dim: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim)


class UnbatchedLayer(ValueError):
    """A layer's call does not keep the samples apart along the batch dimension (a (T, T) bias lookup, a
    flattened (B·T, D) input, batch-second data): its closed form or ``torch.func`` replay does not apply.
    ``unit`` names the module."""

    def __init__(self, message: str, unit: str) -> None:
        super().__init__(message)
        self.unit = unit


def _pairs(name: str, module: nn.Module, uses: list, batch: int) -> list[tuple[Tensor, Tensor]]:
    """(first input, output gradient) of each call whose output reached the loss, batch-checked."""
    out = []
    for use in uses:
        if 0 not in use.grads:  # output did not reach f: zero gradient from this use
            continue
        h, g = use.args[0].detach(), use.grads[0]
        if h.shape[0] != batch or g.shape[0] != batch:
            raise UnbatchedLayer(
                f"Layer '{name}' ({type(module).__name__}) got an input of shape {tuple(h.shape)}, whose "
                f"first dimension is not the batch ({batch}). Per-sample norms need batch-first layers.", name
            )
        out.append((h, g))
    return out


def unfold(module: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input as columns (B, C_in·k, L), C_in slowest: the conv is W (C_out, C_in·k) @ cols.

    A strided view (B, C, k..., L...) of the padded input and one copy into the (B, C·k, L) layout (as Opacus'
    ``unfold2d``; cheaper than ``F.unfold``, and 1-d and 3-d alike). No transpose follows, so nothing
    is copied again later.
    """
    if any(reversed_padding(module)):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, reversed_padding(module), mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    size = [(n - d * (k - 1) - 1) // s + 1 for n, k, s, d in zip(x.shape[2:], kernel, stride, dilation, strict=True)]
    st = x.stride()
    cols = x.as_strided(
        (*x.shape[:2], *kernel, *size),
        (*st[:2], *(a * d for a, d in zip(st[2:], dilation, strict=True)),
         *(a * s for a, s in zip(st[2:], stride, strict=True))),
    )  # fmt: skip
    return cols.reshape(x.shape[0], x.shape[1] * math.prod(kernel), math.prod(size))


def conv_sq(name: str, module: nn.Module, uses: list, batch: int, names: set[str]) -> Tensor:
    """Conv1d/2d/3d: per group, a Linear layer from the C_in·k/G columns to the C_out/G channels over L positions.

    Three exact forms: the Gram form on the unfolded input when L·(a + b) ≤ 2·a·b (a = C_in·k/G, b = C_out/G);
    otherwise the direct per-sample gradient, by kernel offsets without unfolding (:func:`_conv_by_offsets`)
    for stride 1 and C_in/G ≥ 8, else as one ``bmm`` on the unfolded input (tiny C_in: GEMMs too thin).
    """
    pairs = _pairs(name, module, uses, batch)
    out = torch.zeros(batch, dtype=module.weight.dtype, device=module.weight.device)
    if not pairs:
        return out
    groups, c_in, c_out = module.groups, module.in_channels, module.out_channels
    if "bias" in names:  # ∇b = Σ over positions of g, per output channel
        out = out + row_sq(sum(g.reshape(batch, c_out, -1).sum(2) for _, g in pairs))
    if "weight" not in names:
        return out
    length = sum(g[0, 0].numel() for _, g in pairs)
    a, b = c_in // groups * math.prod(module.kernel_size), c_out // groups
    if length * (a + b) > 2 * a * b and all(s == 1 for s in module.stride) and c_in // groups >= 8:
        return out + _conv_by_offsets(module, pairs, batch)
    hs, gs = [], []
    for x, g in pairs:
        cols = unfold(module, x)
        hs.append(cols.reshape(batch * groups, -1, cols.shape[-1]))  # a view: C_in is the slowest of C_in·k
        gs.append(g.reshape(batch * groups, b, -1))
    h, g = _cat(hs, 2), _cat(gs, 2)  # (B·G, C_in·k/G, L) and (B·G, C_out/G, L)
    return out + sum_outer_sq(h.mT, g.mT).reshape(batch, groups).sum(1)


def _conv_by_offsets(module: nn.Module, pairs: list[tuple[Tensor, Tensor]], batch: int) -> Tensor:
    """‖∇W‖² per sample of a stride-1 convolution without unfolding its input.

    The kernel slice at offset o is ∇W[:, :, o] = Σ_p g[p] x_pad[p + o] over output positions p. On the padded
    input flattened to (C, P) and g zero-padded to the padded grid's row length, the positions p + o of all p
    are one contiguous window of x_pad, so each slice is one ``bmm`` reading a strided view: no im2col copy.
    """
    groups, st = module.groups, None
    slices: dict[tuple, Tensor] = {}
    for x, g in pairs:
        pad = list(reversed_padding(module))
        pad[-1] += 1  # one more row (plane) at the end: the last windows run up to k - 1 elements past the grid
        xp = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        grid, size = xp.shape[2:], g.shape[2:]
        # zero columns of g where the window runs past a row of the output
        gp = F.pad(g, [v for j in range(len(grid) - 1, 0, -1) for v in (0, grid[j] - size[j])])
        st = [math.prod(grid[j + 1 :]) for j in range(len(grid))]
        n = size[0] * st[0]
        xf = xp.reshape(batch * groups, x.shape[1] // groups, -1)
        gf = gp.reshape(batch * groups, g.shape[1] // groups, n)
        for idx in itertools.product(*(range(k) for k in module.kernel_size)):
            off = sum(i * d * s for i, d, s in zip(idx, module.dilation, st, strict=True))
            w = torch.bmm(gf, xf[:, :, off : off + n].mT)  # (B·G, C_out/G, C_in/G)
            slices[idx] = slices[idx] + w if idx in slices else w  # several calls: gradients add up
    return sum(sample_sq(w) for w in slices.values()).reshape(batch, groups).sum(1)


def _normalized(module: nn.Module, x: Tensor) -> Tensor:
    """x̂: the layer's input normalised with the layer's eps and without its affine parameters."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, eps=module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, eps=module.eps)
    return F.rms_norm(x, module.normalized_shape, eps=module.eps)


def norm_sq(name: str, module: nn.Module, uses: list, batch: int, names: set[str]) -> Tensor:
    """LayerNorm, GroupNorm, RMSNorm: ∇γ = Σₜ gₜ ⊙ x̂ₜ, ∇β = Σₜ gₜ per sample (t over positions).

    Only the direct form: its cost T·D is below the Gram form's T²·D for every shape.
    """
    d = math.prod(module.normalized_shape) if not isinstance(module, nn.GroupNorm) else module.num_channels
    gamma = beta = None
    for x, g in _pairs(name, module, uses, batch):
        # (B, T, D) with the parameters' dimensions last; GroupNorm's channels are dimension 1
        layout = (lambda t: t.reshape(batch, d, -1).mT) if isinstance(module, nn.GroupNorm) else (
            lambda t: t.reshape(batch, -1, d))
        if "weight" in names:
            term = sum_over_sequence(layout(g * _normalized(module, x)))
            gamma = term if gamma is None else gamma + term
        if "bias" in names:
            term = sum_over_sequence(layout(g))
            beta = term if beta is None else beta + term
    out = torch.zeros(batch, dtype=module.weight.dtype, device=module.weight.device)
    return out + sum(row_sq(t) for t in (gamma, beta) if t is not None)


def embedding_sq(name: str, module: nn.Module, uses: list, batch: int, names: set[str]) -> Tensor:
    """Embedding: the per-sample gradient of the table has one row Σ_{t: tokₜ = v} gₜ per distinct token v.

    Gram form Σₜ,ₛ [tokₜ = tokₛ] gₜ·gₛ (cost T²·D) for short sequences; otherwise the direct form adds the
    rows of equal (sample, token) pairs with ``index_add`` after a sort (cost T·D plus the sort).
    """
    toks, gs = [], []
    for tok, g in _pairs(name, module, uses, batch):
        tok, g = tok.reshape(batch, -1), g.reshape(batch, -1, g.shape[-1])
        if module.padding_idx is not None:  # the padding row gets no gradient
            g = g * (tok != module.padding_idx).unsqueeze(-1).to(g.dtype)
        toks.append(tok)
        gs.append(g)
    if not gs:
        return torch.zeros(batch, dtype=module.weight.dtype, device=module.weight.device)
    tok, g = _cat(toks, 1), _cat(gs, 1)
    t, dim = g.shape[1], g.shape[2]
    if t == 1:
        return row_sq(g[:, 0])
    if t <= 16:
        same = (tok.unsqueeze(2) == tok.unsqueeze(1)).to(g.dtype)
        return (torch.bmm(g, g.mT) * same).sum((1, 2))
    keys = tok + torch.arange(batch, device=tok.device).unsqueeze(1) * module.num_embeddings
    unique, inverse = torch.unique(keys.reshape(-1), return_inverse=True)
    rows = g.new_zeros(unique.shape[0], dim).index_add_(0, inverse, g.reshape(-1, dim))
    return g.new_zeros(batch).index_add_(0, unique // module.num_embeddings, row_sq(rows))


def outer_factors(name: str, module: nn.Module, uses: list, batch: int) -> list[tuple[Tensor, Tensor]]:
    """The weight gradient of a Linear or Embedding layer as Σₜ aₜ bₜᵀ: (a, b) per call, each (B, T, ·).

    Linear: a = g (output gradient), b = h (input). Embedding: a = one-hot token ids, kept as the ids (B, T)
    of integer dtype, b = g with the padding positions zeroed. For tied weights (:func:`tied_sq`).
    """
    out = []
    for x, g in _pairs(name, module, uses, batch):
        if isinstance(module, nn.Embedding):
            tok, g = x.reshape(batch, -1), g.reshape(batch, -1, g.shape[-1])
            if module.padding_idx is not None:
                g = g * (tok != module.padding_idx).unsqueeze(-1).to(g.dtype)
            out.append((tok, g))
        else:
            out.append((g.reshape(batch, -1, g.shape[-1]), x.reshape(batch, -1, x.shape[-1])))
    return out


def _row_gram(a: Tensor, c: Tensor) -> Tensor:
    """(aₜ·cₛ) for (B, T, ·) factors, where integer factors stand for one-hot rows (token ids)."""
    if a.is_floating_point() and c.is_floating_point():
        return torch.bmm(a, c.mT)
    if not a.is_floating_point() and not c.is_floating_point():
        return (a.unsqueeze(2) == c.unsqueeze(1)).to(torch.get_default_dtype())
    if a.is_floating_point():
        return _row_gram(c, a).mT
    # one-hot(aₜ)·cₛ = cₛ[aₜ]
    return torch.gather(c.mT, 1, a.unsqueeze(2).expand(-1, -1, c.shape[1]))


def tied_sq(factors: list[tuple[Tensor, Tensor]]) -> Tensor:
    """‖Σ over calls Σₜ aₜ bₜᵀ‖² per sample for a weight shared by Linear and Embedding layers (tied weights):
    the Gram form over the positions of all calls, Σₜ,ₛ (aₜ·aₛ)(bₜ·bₛ), cross terms between calls included."""
    total = None
    for i, (a, b) in enumerate(factors):
        for j in range(i, len(factors)):
            c, d = factors[j]
            term = (_row_gram(a, c).to(b.dtype) * torch.bmm(b, d.mT)).sum((1, 2)) * (1 if i == j else 2)
            total = term if total is None else total + term
    return total


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """MultiheadAttention's masks (True: not attended; or additive floats) as additive floats."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, -math.inf)


def _replay_attention(module: nn.MultiheadAttention, use: object, batch: int) -> tuple[list, list]:
    """Re-run one call of the attention from its recorded inputs, with autograd on the q, k, v projections and
    the out-projection's input only (one batched backward, no per-sample one), and return the (input, output
    gradient) pairs of the four Linear maps: q, k, v in-projections and out_proj."""
    bound = inspect.signature(module.forward).bind(*use.args, **use.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    query, key, value = (t.detach() for t in (a["query"], a["key"], a["value"]))
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = module.embed_dim, module.num_heads
    dtype = query.dtype  # the records' (float32 for half-precision records), also for bfloat16 parameters
    if qkv_same_embed_dim(module):
        wq, wk, wv = module.in_proj_weight.detach().to(dtype).chunk(3)
    else:
        wq, wk, wv = (w.detach().to(dtype) for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight))
    bq = bk = bv = None
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.detach().to(dtype).chunk(3)
    with torch.enable_grad():
        q, k, v = (F.linear(x, w, b).detach().requires_grad_()
                   for x, w, b in ((query, wq, bq), (key, wk, bk), (value, wv, bv)))
        t, s = q.shape[1], k.shape[1]
        split = lambda z, n: z.reshape(batch, n, heads, e // heads).transpose(1, 2)  # noqa: E731
        scores = split(q, t) @ split(k, s).mT / math.sqrt(e // heads)
        mask = _float_mask(a["attn_mask"], scores.dtype)
        if mask is not None:
            scores = scores + (mask.reshape(batch, heads, t, s) if mask.ndim == 3 else mask)
        padding = _float_mask(a["key_padding_mask"], scores.dtype)
        if padding is not None:
            scores = scores + padding.reshape(batch, 1, 1, s)
        weights = scores.softmax(-1)
        o = (weights @ split(v, s)).transpose(1, 2).reshape(batch, t, e)  # out_proj's input
        g_out = use.grads[0] if module.batch_first else use.grads[0].transpose(0, 1)
        outs, grads = [F.linear(o, module.out_proj.weight.detach().to(dtype), None)], [g_out]
        if 1 in use.grads:  # the attention weights reached the loss too
            outs.append(weights.mean(1) if a["average_attn_weights"] else weights)
            grads.append(use.grads[1])
        dq, dk, dv = torch.autograd.grad(outs, (q, k, v), grads, allow_unused=True)
    zero = lambda d, z: torch.zeros_like(z) if d is None else d  # noqa: E731
    return [query, key, value, o.detach()], [zero(dq, q), zero(dk, k), zero(dv, v), g_out]


def mha_sq(name: str, module: nn.Module, uses: list, batch: int, names: set[str]) -> Tensor:
    """nn.MultiheadAttention: four Linear layers (q, k, v in-projections and out_proj) whose inputs are recorded
    or replayed and whose output gradients come from one batched re-run of the attention."""
    hs: list[list[Tensor]] = [[], [], [], []]
    gs: list[list[Tensor]] = [[], [], [], []]
    for use in uses:
        if 0 not in use.grads and 1 not in use.grads:
            continue
        if 0 not in use.grads:
            use.grads[0] = torch.zeros_like(use.outputs[0])
        g0 = use.grads[0]
        if g0.ndim != 3 or g0.shape[0 if module.batch_first else 1] != batch:
            raise UnbatchedLayer(
                f"Layer '{name}' (MultiheadAttention) returned an output of shape {tuple(g0.shape)} without the "
                f"batch ({batch}) in dimension {0 if module.batch_first else 1}; per-sample norms need batches.", name
            )
        inputs, grads = _replay_attention(module, use, batch)
        for j in range(4):
            hs[j].append(inputs[j])
            gs[j].append(grads[j])
    out = torch.zeros(batch, dtype=module.out_proj.weight.dtype, device=module.out_proj.weight.device)
    if not hs[0]:
        return out
    in_w = bool(names & {"in_proj_weight", "q_proj_weight"})
    weights = (in_w, bool(names & {"in_proj_weight", "k_proj_weight"}), bool(names & {"in_proj_weight",
               "v_proj_weight"}), "out_proj.weight" in names)  # fmt: skip
    biases = ("in_proj_bias" in names,) * 3 + ("out_proj.bias" in names,)
    for j in range(4):
        if weights[j] or biases[j]:
            out = out + linear_sq(_cat(hs[j], 1), _cat(gs[j], 1), weights[j], biases[j])
    return out


def linear_rule(name: str, module: nn.Module, uses: list, batch: int, names: set[str]) -> Tensor:
    """Linear: the ghost norm over all middle dimensions as a sequence."""
    pairs = _pairs(name, module, uses, batch)
    if not pairs:
        return torch.zeros(batch, dtype=module.weight.dtype, device=module.weight.device)
    h = _cat([h.reshape(batch, -1, h.shape[-1]) for h, _ in pairs], 1)
    g = _cat([g.reshape(batch, -1, g.shape[-1]) for _, g in pairs], 1)
    return linear_sq(h, g, "weight" in names, "bias" in names)


def rule(module: nn.Module, names: set[str]) -> Callable[..., Tensor] | None:
    """The closed-form rule for ``module`` with trainable parameters ``names``, or None (then torch.func).

    Types are matched exactly: a subclass may override ``forward`` (LoRA, quantised layers), and the rule
    would then be wrong.
    """
    kind = layer_type(module)  # FSDP2's FSDPLinear is a Linear with hooks
    if kind in LINEAR_LAYERS and names <= {"weight", "bias"}:
        return linear_rule
    if kind in CONV_LAYERS and names <= {"weight", "bias"}:
        return conv_sq
    if kind in NORM_LAYERS and names <= {"weight", "bias"}:
        return norm_sq
    if kind is nn.Embedding and names == {"weight"}:
        # max_norm renormalises the table in the forward, scale_grad_by_freq couples the samples' tokens
        return embedding_sq if module.max_norm is None and not module.scale_grad_by_freq else None
    if kind is nn.MultiheadAttention and names <= MHA_PARAMS:
        plain = module.bias_k is None and not module.add_zero_attn
        return mha_sq if plain and (module.dropout == 0 or not module.training) else None
    return None


def linear_squared_norms(h: Tensor, g: Tensor, *, weight: bool = True, bias: bool = True) -> Tensor:
    """Per-sample ‖∇_W fᵢ‖² + ‖∇_b fᵢ‖² of a Linear layer from its input ``h`` and output gradient ``g``.

    Args:
        h: layer input of shape (B, d_in) or (B, T..., d_in) (all middle dimensions are a sequence).
        g: gradient of Σᵢ fᵢ with respect to the layer output, (B, d_out) or (B, T..., d_out).
        weight: include the weight's term (False when the weight is frozen).
        bias: include the bias' term (False when there is no bias or it is frozen).

    Example:


        >>> h, g = torch.randn(3, 4), torch.randn(3, 2)
        >>> explicit = torch.einsum("bo,bi->boi", g, h).square().sum((1, 2)) + g.square().sum(1)
        >>> torch.allclose(linear_squared_norms(h, g), explicit)
        True
    """
    b = h.shape[0]
    if b == 0:  # an empty batch: no per-sample norms (a reshape to (0, -1, d) would be ambiguous)
        return g.new_zeros(0)
    h3, g3 = h.reshape(b, -1, h.shape[-1]), g.reshape(b, -1, g.shape[-1])
    if h3.shape[1] == 1 and weight:
        # No sequence: ‖gᵢhᵢᵀ‖²_F = ‖gᵢ‖²‖hᵢ‖² and the bias term is ‖gᵢ‖² itself, so ‖gᵢ‖² is computed once
        # (the fused monitor runs this on every layer of every monitored training step).
        g_sq, h_sq = row_sq(g3[:, 0]), row_sq(h3[:, 0])
        return g_sq * (h_sq + 1) if bias else g_sq * h_sq
    return linear_sq(h3, g3, weight, bias)
