"""The MLP inequality between input and parameter gradients (Dherin et al., "The Geometric Occam's
Razor Implicit in Deep Learning").

For a chain h⁽ᵗ⁺¹⁾ = g(W⁽ᵗ⁾h⁽ᵗ⁾ + b⁽ᵗ⁾), h⁽¹⁾ = x, and any scalar f of the output, per sample:

    ‖∇ₓf‖² · Σₜ (1 + ‖h⁽ᵗ⁾‖²) / (‖W⁽ᵗ⁾‖₂² ‖∇ₓh⁽ᵗ⁾‖₂²)  ≤  ‖∇θf‖².

The proof, the bias and frozen-weight cases, and how ‖∇ₓh⁽ᵗ⁾‖₂ is computed (exact Jacobians, or a power
iteration that cannot fake a ratio above 1): ``docs/functional.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import jacfwd, jvp, vjp, vmap

from lightning_gp.functional._checks import (
    check_bool,
    check_finite,
    check_floating_input,
    check_non_empty_batch,
    check_per_sample,
)
from lightning_gp.functional._layers import DROPOUT_LAYERS
from lightning_gp.functional._norm_rules import linear_squared_norms
from lightning_gp.functional._recorder import GradNormRecorder
from lightning_gp.functional._rng import seeded_generator

# Modules whose per-sample Jacobian is diagonal: they may sit between the Linear layers of a chain.
ELEMENTWISE = (
    nn.Tanh, nn.ReLU, nn.GELU, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
    nn.PReLU,
)  # fmt: skip
# Modules that do not change values (Dropout only in eval mode; Flatten only of the non-batch dimensions).
PASS_THROUGH = (nn.Identity, nn.Flatten, *DROPOUT_LAYERS)


class MLPInequality(NamedTuple):
    """Result of `mlp_inequality`; B = samples, T = Linear layers.

    Attributes:
        lhs: ‖∇ₓf‖²·Σₜ termₜ, (B,).
        rhs: ‖∇θf‖² over the Linear layers' trainable parameters, (B,).
        ratio: lhs / rhs, (B,); 0 where rhs = 0 (then f does not depend on the layers and lhs = 0 too).
        ratio_lower: the ratio with a certified upper bound of ‖∇ₓh⁽ᵗ⁾‖₂; equals ``ratio`` when exact.
        lhs_terms: per-layer left terms ‖∇ₓf‖²(1 + ‖h⁽ᵗ⁾‖²)/(‖W⁽ᵗ⁾‖₂²‖∇ₓh⁽ᵗ⁾‖₂²), (B, T).
        rhs_terms: per-layer right terms ‖∇_W f‖² + ‖∇_b f‖², (B, T); each ≥ its left term on a chain.
        layer_names: names of the T Linear layers in ``model.named_modules()``, in chain order.
        input_grad_norm: ‖∇ₓf‖, (B,).
        activation_norm: ‖h⁽ᵗ⁾‖, (B, T).
        weight_norm: ‖W⁽ᵗ⁾‖₂, (T,).
        jacobian_norm: ‖∇ₓh⁽ᵗ⁾‖₂ as used in ``lhs`` (exact, or a power-iteration lower bound), (B, T).
        jacobian_norm_upper: certified upper bound of ‖∇ₓh⁽ᵗ⁾‖₂ used in ``ratio_lower`` (inf if none), (B, T).
        jacobian_exact: whether ``jacobian_norm`` is exact.
        iterations: power iterations run (0 when exact).
        is_chain: False when computed with ``allow_non_chain=True`` on a model that is not a chain: then the
            inequality need not hold.
    """

    lhs: Tensor
    rhs: Tensor
    ratio: Tensor
    ratio_lower: Tensor
    lhs_terms: Tensor
    rhs_terms: Tensor
    layer_names: tuple[str, ...]
    input_grad_norm: Tensor
    activation_norm: Tensor
    weight_norm: Tensor
    jacobian_norm: Tensor
    jacobian_norm_upper: Tensor
    jacobian_exact: bool
    iterations: int
    is_chain: bool


def chain_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves of an ``nn.Sequential`` (nested ones flattened), checked to form an MLP chain.

    Raises:
        ValueError: naming the first module that is not a Linear, elementwise or pass-through layer.

    Example:


        >>> net = nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2))
        >>> [name for name, _ in chain_layers(net)]
        ['0', '1.0', '1.1', '2']
    """
    hint = "Pass `allow_non_chain=True` to compute it anyway (flagged; the bound need not hold)."
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"The MLP inequality needs a sequential chain (an nn.Sequential), got {type(model).__name__}. {hint}"
        )
    leaves: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, seq: nn.Sequential) -> None:
        for name, child in seq.named_children():
            full = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(full + ".", child)
            elif isinstance(child, (nn.Linear, *ELEMENTWISE, *PASS_THROUGH)):
                if isinstance(child, DROPOUT_LAYERS) and child.training:
                    raise ValueError(
                        f"Module '{full}' ({type(child).__name__}) is in training mode: its random mask "
                        f"makes f stochastic. Call `model.eval()` before `mlp_inequality`."
                    )
                if isinstance(child, nn.Flatten) and (child.start_dim != 1 or child.end_dim != -1):
                    raise ValueError(
                        f"Module '{full}' is Flatten(start_dim={child.start_dim}, end_dim={child.end_dim}); "
                        f"a chain may only flatten all non-batch dimensions (start_dim=1, end_dim=-1). {hint}"
                    )
                leaves.append((full, child))
            else:
                raise ValueError(
                    f"Module '{full}' ({type(child).__name__}) is not a Linear, elementwise activation, "
                    f"Dropout, Flatten or Identity layer, so the model is not an MLP chain. {hint}"
                )

    walk("", model)
    if not any(isinstance(m, nn.Linear) for _, m in leaves):
        raise ValueError(f"The model contains no nn.Linear layer: {model}")
    return leaves


def _check_finite_values(t: Tensor, name: str, what: str) -> None:
    """Refuse NaN/inf: the Jacobian norms' eigen-solvers cannot run on them (one host sync, a diagnostic)."""
    bad = ~torch.isfinite(t.detach().reshape(t.shape[0], -1)).all(dim=1) if t.numel() else None
    if bad is not None and bool(bad.any()):
        rows = bad.nonzero()[:5, 0].tolist()
        raise ValueError(
            f"`{name}` holds NaN or inf values ({what} {rows}); the inequality's Jacobian norms are undefined "
            f"there. Find where they come from (e.g. `torch.isfinite({name.split('.')[-1]}).all()`) before measuring."
        )


def _sigma_from_jacobian(jac: Tensor) -> Tensor:
    """Spectral norm of each (n, d) matrix of a batch: the largest eigenvalue of the smaller Gram matrix
    (3–4× cheaper than an SVD; the top eigenvalue of a PSD matrix is accurate to machine precision)."""
    gram = jac @ jac.mT if jac.shape[-2] <= jac.shape[-1] else jac.mT @ jac
    try:
        return torch.linalg.eigvalsh(gram)[..., -1].clamp_min(0).sqrt()
    except torch.linalg.LinAlgError:  # LAPACK's eigh can fail on rank-deficient float32 Grams; SVD does not
        return torch.linalg.matrix_norm(jac, ord=2)


class _ChainJacobian:
    """Jacobians of the inputs of every Linear of a chain with respect to x, by explicit propagation."""

    def __init__(self, leaves: list[tuple[str, nn.Module]], x: Tensor) -> None:
        self.ops: list[tuple[str, Tensor]] = []  # ("lin", W) or ("diag", slope (B, dim))
        z = x
        last = max(i for i, (_, m) in enumerate(leaves) if isinstance(m, nn.Linear))
        for _, mod in leaves[: last + 1]:
            if isinstance(mod, nn.Linear):
                self.ops.append(("lin", mod.weight.detach()))
                z = mod(z)
            elif isinstance(mod, ELEMENTWISE):
                # The slope of an elementwise map is its jvp along ones (clone: the map may be in place).
                z, slope = jvp(mod, (z.clone(),), (torch.ones_like(z),))
                self.ops.append(("diag", slope.reshape(len(x), -1)))
            else:
                z = mod(z)
        self.batch, self.n = len(x), x[0].numel()

    def exact(self, chunk_elems: int = 1 << 22) -> Tensor:
        widths = [w.shape[1] for op, w in self.ops if op == "lin"] + [self.n]
        chunk = max(1, chunk_elems // (self.n * max(widths)))
        out = []
        for start in range(0, self.batch, chunk):
            b = min(chunk, self.batch - start)
            jac = torch.eye(self.n, dtype=self.ops[0][1].dtype, device=self.ops[0][1].device).expand(b, -1, -1)
            sig = []
            for op, t in self.ops:  # jac[i] = (∇ₓh)ᵀ of sample i: rows are input directions
                if op == "lin":
                    sig.append(_sigma_from_jacobian(jac))
                    jac = jac @ t.T
                else:
                    jac = jac * t[start : start + b, None, :]
            out.append(torch.stack(sig, 1))
        return torch.cat(out)

    def upper(self) -> Tensor:
        """Certified ‖∇ₓh⁽ᵗ⁾‖₂ ≤ Πₛ<ₜ ‖W⁽ˢ⁾‖₂·max|slope| (submultiplicativity)."""
        bound = torch.ones(self.batch, dtype=self.ops[0][1].dtype, device=self.ops[0][1].device)
        out = []
        for op, t in self.ops:
            if op == "lin":
                out.append(bound)
                bound = bound * _sigma_from_jacobian(t)
            else:
                bound = bound * t.abs().amax(1)
        return torch.stack(out, 1)

    def jv(self, v: Tensor) -> list[Tensor]:
        """(B, T, n) tangents → [J_t v[:, t]] for each layer t."""
        out = []
        for op, t in self.ops:
            if op == "lin":
                out.append(v[:, len(out)])
                v = v @ t.T
            else:
                v = v * t[:, None, :]
        return out

    def vjp(self, u: list[Tensor]) -> Tensor:
        """[u_t] cotangents at each layer's input → (B, T, n) with row t = J_tᵀ u_t."""
        c, t_index = None, len(u)
        for op, t in reversed(self.ops):
            if op == "lin":
                t_index -= 1
                if c is not None:
                    c = c @ t
                else:
                    c = u[0].new_zeros(self.batch, len(u), t.shape[1])
                c[:, t_index] = u[t_index]
            else:
                c = c * t[:, None, :]
        return c


class _FuncJacobian:
    """Same interface by torch.func for any model: fn(xᵢ) returns the inputs of the given Linear layers."""

    def __init__(self, model: nn.Module, linears: list[nn.Module], x: Tensor) -> None:
        self.model, self.linears, self.x = model, linears, x
        self.batch, self.n, self.shape = len(x), x[0].numel(), x.shape[1:]

    def fn(self, xi: Tensor) -> tuple[Tensor, ...]:
        captured: dict[int, Tensor] = {}

        def hook(mod: nn.Module, args: tuple) -> None:
            captured[id(mod)] = args[0].reshape(-1)

        handles = [m.register_forward_pre_hook(hook) for m in self.linears]
        try:
            self.model(xi.unsqueeze(0))
        finally:
            for h in handles:
                h.remove()
        return tuple(captured[id(m)] for m in self.linears)

    def exact(self) -> Tensor:
        jacs = vmap(jacfwd(self.fn), chunk_size=32)(self.x)
        return torch.stack([_sigma_from_jacobian(j.reshape(self.batch, -1, self.n)) for j in jacs], 1)

    def upper(self) -> Tensor:
        return torch.full((self.batch, len(self.linears)), float("inf"), device=self.x.device)

    def jv(self, v: Tensor) -> list[Tensor]:
        def one(xi: Tensor, vi: Tensor) -> tuple[Tensor, ...]:
            return vmap(lambda w: jvp(self.fn, (xi,), (w.reshape(self.shape),))[1])(vi)

        outs = vmap(one)(self.x, v)
        return [o[:, t] for t, o in enumerate(outs)]

    def vjp(self, u: list[Tensor]) -> Tensor:
        eye = torch.eye(len(u), dtype=u[0].dtype, device=u[0].device)
        cots = tuple(eye[t][None, :, None] * ut[:, None, :] for t, ut in enumerate(u))  # (B, T, d_t)

        def one(xi: Tensor, ci: tuple[Tensor, ...]) -> Tensor:
            _, pull = vjp(self.fn, xi)
            return vmap(lambda c: pull(c)[0].reshape(-1))(ci)

        return vmap(one)(self.x, cots)


def _power(
    jac: _ChainJacobian | _FuncJacobian, seed: Tensor, layers: int, tol: float, max_iter: int
) -> tuple[Tensor, int]:
    """Batched power iteration on JₜᵀJₜ for all layers at once; returns never-decreasing lower bounds."""
    v = seed.reshape(jac.batch, -1)
    norm = v.norm(dim=1, keepdim=True)
    if bool((norm == 0).any()):
        # ∇ₓf = 0 (e.g. all ReLUs dead): any start will do, but never draw from the global RNG, whose
        # state the training run owns (dropout masks would change).
        gen = seeded_generator(v.device, 0)
        rand = torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype)
        v = torch.where(norm > 0, v, rand)
        norm = v.norm(dim=1, keepdim=True)
    v = v / norm
    v = v[:, None, :].expand(-1, layers, -1).contiguous()
    sigma = torch.zeros(jac.batch, layers, dtype=v.dtype, device=v.device)
    it = 0
    while it < max(1, max_iter):
        it += 1
        u = jac.jv(v)
        new = torch.maximum(sigma, torch.stack([ut.norm(dim=1) for ut in u], 1))
        w = jac.vjp(u)
        wn = w.norm(dim=2)
        new = torch.maximum(new, wn.sqrt())  # ‖JᵀJv‖ ≥ ‖Jv‖² for unit v: also a lower bound of σ²
        done = bool(((new - sigma) <= tol * new).all())
        sigma = new
        if done:
            break
        v = torch.where(wn[..., None] > 0, w / wn[..., None].clamp_min(1e-30), v)
    return sigma, it


def mlp_inequality(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    *,
    max_samples: int | None = None,
    allow_non_chain: bool = False,
    exact_max_dim: int = 256,
    tol: float = 1e-4,
    max_iter: int = 200,
) -> MLPInequality:
    """Both sides of the MLP inequality, per sample, with per-layer terms (see the module docstring).

    Args:
        model: an ``nn.Sequential`` chain of Linear, elementwise activation, eval-mode Dropout, Flatten and
            Identity layers (nested Sequentials are flattened).
        inputs: floating-point batch (B, ...); need not require grad.
        loss_fn: maps the model's output to per-sample values fᵢ, shape (B,).
        max_samples: use only the first ``max_samples`` samples (the Jacobian norms cost ~n forward passes).
            The forward still runs on the whole batch, so ``loss_fn`` sees all outputs (and may use
            full-batch targets); the result has ``max_samples`` rows.
        allow_non_chain: compute for any model with Linear layers (each called once on (B, d) inputs)
            instead of raising; the result has ``is_chain=False`` and the bound need not hold.
        exact_max_dim: exact Jacobian norms when x has at most this many features, else power iteration.
        tol: the power iteration stops when no estimate grew by more than ``tol`` (relative) in a step.
        max_iter: the most power iterations.

    Example:


        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        >>> r = mlp_inequality(model, torch.randn(16, 4), lambda out: out[:, 0])
        >>> bool((r.ratio <= 1 + 1e-5).all()), r.lhs_terms.shape, r.layer_names
        (True, torch.Size([16, 2]), ('0', '2'))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be an nn.Module (an nn.Sequential chain), got {type(model).__name__}.")
    check_floating_input(inputs, "inputs", requires_grad=False)
    check_non_empty_batch(inputs, "inputs", "mlp_inequality (per-sample Jacobian norms of at least one sample)")
    check_finite(tol, "tol", strict=True, hint="Pass a small relative tolerance such as 1e-4.")
    check_bool(allow_non_chain, "allow_non_chain")
    _check_finite_values(inputs, "inputs", "samples")
    for value, arg, minimum in ((max_iter, "max_iter", 1), (exact_max_dim, "exact_max_dim", 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`{arg}` must be an int ≥ {minimum}, got {value!r}.")
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1
    ):
        raise ValueError(f"`max_samples` must be a positive int or None, got {max_samples!r}.")
    try:
        leaves = chain_layers(model)
        is_chain = True
    except ValueError:
        if not allow_non_chain:
            raise
        leaves, is_chain = None, False
    if leaves is not None:
        names = {id(m): n for n, m in model.named_modules()}
        linears = [(names[id(m)], m) for _, m in leaves if isinstance(m, nn.Linear)]
    else:
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError(f"The model contains no nn.Linear layer: {type(model).__name__}")
    for name, m in linears:
        _check_finite_values(m.weight, f"{name}.weight", "rows")
    # The forward runs on the whole batch, so that `loss_fn` may close over full-batch targets; only the
    # first `max_samples` values are differentiated and kept (samples are independent in a chain).
    batch = min(len(inputs), max_samples or len(inputs))
    captured = _capture(model, inputs.detach().requires_grad_(True), loss_fn, linears, batch)
    h, z, g, grad_x = captured.inputs, captured.outputs, captured.output_grads, captured.input_grad
    x = inputs[:batch].detach()
    ws = [m.weight.detach() for _, m in linears]
    weight_norm = torch.stack([_sigma_from_jacobian(w) for w in ws])  # exact ‖W‖₂, 2× cheaper than an SVD
    has_w = [m.weight.requires_grad for _, m in linears]
    has_b = [m.bias is not None and m.bias.requires_grad for _, m in linears]
    hs = [h[n] for n, _ in linears]
    gs = [g.get(n, torch.zeros_like(z[n])) for n, _ in linears]
    rhs_terms = torch.stack(
        [linear_squared_norms(hh, gg, weight=w, bias=b) for hh, gg, w, b in zip(hs, gs, has_w, has_b, strict=True)], 1
    )
    act = torch.stack([hh.norm(dim=1) for hh in hs], 1)
    coef = torch.stack([float(b) + float(w) * hh.square().sum(1) for hh, w, b in zip(hs, has_w, has_b, strict=True)], 1)
    with torch.no_grad():
        linear_modules = [m for _, m in linears]
        jac = _ChainJacobian(leaves, x.detach()) if is_chain else _FuncJacobian(model, linear_modules, x.detach())
        exact = x[0].numel() <= exact_max_dim
        if exact:
            sigma, iterations = jac.exact(), 0
            upper = sigma
        else:
            sigma, iterations = _power(jac, grad_x, len(linears), tol, max_iter)
            upper = jac.upper()
    gx2 = grad_x.reshape(batch, -1).square().sum(1, keepdim=True)

    def terms(s: Tensor) -> Tensor:
        den = weight_norm.square() * s.square()
        # den = 0 means ∇ₓh or W vanishes, hence ∇ₓf = Jᵀ Wᵀ g = 0 too: the term is 0, not 0/0.
        return torch.where(den > 0, gx2 * coef / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)

    lhs_terms, lower_terms = terms(sigma), terms(upper)
    lhs, rhs = lhs_terms.sum(1), rhs_terms.sum(1)

    def ratio(num: Tensor) -> Tensor:
        return torch.where(rhs > 0, num / rhs.clamp_min(torch.finfo(rhs.dtype).tiny), 0.0)

    return MLPInequality(
        lhs=lhs, rhs=rhs, ratio=ratio(lhs), ratio_lower=ratio(lower_terms.sum(1)), lhs_terms=lhs_terms,
        rhs_terms=rhs_terms, layer_names=tuple(n for n, _ in linears), input_grad_norm=gx2[:, 0].sqrt(),
        activation_norm=act, weight_norm=weight_norm, jacobian_norm=sigma, jacobian_norm_upper=upper,
        jacobian_exact=exact, iterations=iterations, is_chain=is_chain,
    )  # fmt: skip


@dataclass(frozen=True)
class _Captured:
    """What :func:`_capture` records, keyed by Linear layer name, cut to the kept samples."""

    inputs: dict[str, Tensor]  # h, each Linear's input
    outputs: dict[str, Tensor]  # z, its output
    output_grads: dict[str, Tensor]  # g = ∂f/∂z (absent for a layer the values do not reach)
    input_grad: Tensor  # ∇ₓf


def _capture(
    model: nn.Module,
    x: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    linears: list[tuple[str, nn.Module]],
    keep: int,
) -> _Captured:
    """One forward and one backward of the first ``keep`` values, recorded by a
    :class:`~lightning_gp.functional._recorder.GradNormRecorder` on the Linear layers: each one's input h, output z
    and output gradient g, and ∇ₓf, all cut to the first ``keep`` samples."""
    recorder = GradNormRecorder(model, modules=dict(linears))
    with recorder, torch.enable_grad():
        values = check_per_sample(loss_fn(model(x)), len(x), "loss_fn(outputs)")[:keep]
        for name, _ in linears:
            calls = recorder.calls(name)
            if len(calls) > 1:
                raise ValueError(f"Linear layer '{name}' is called more than once; the inequality needs one use.")
            if calls and calls[0].args[0].ndim != 2:
                raise ValueError(
                    f"Linear layer '{name}' got an input of shape {tuple(calls[0].args[0].shape)}; the MLP "
                    f"inequality needs (batch, features) inputs (add nn.Flatten() before it)."
                )
        missing = [n for n, _ in linears if not recorder.calls(n)]
        if missing:
            raise ValueError(f"Linear layers {missing} were not called by the model's forward.")
        calls = {n: recorder.calls(n)[0] for n, _ in linears}
        outs = [c.output for c in calls.values() if c.output.requires_grad]
        grads = torch.autograd.grad(values.sum(), [x, *outs], allow_unused=True)
    input_grad = grads[0] if grads[0] is not None else torch.zeros_like(x)
    h = {n: c.args[0].detach()[:keep] for n, c in calls.items()}
    z = {n: c.output[:keep] for n, c in calls.items()}
    g = {n: c.grads[0][:keep] for n, c in calls.items() if 0 in c.grads}
    return _Captured(inputs=h, outputs=z, output_grads=g, input_grad=input_grad[:keep])
