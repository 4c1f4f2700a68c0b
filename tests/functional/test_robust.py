"""robust_accuracy against the closed-form worst case of a linear classifier, and the model state it leaves.

For logits Wx + b the worst case over the ε-ball ∩ [0, 1] box is exact: sample i is robust iff for every class
j ≠ yᵢ, min over the box-clipped ball of (w_y − w_j)·(x + δ) + (b_y − b_j) > 0, taken coordinate by coordinate
(l∞: each δ_k at the end of its interval the sign of the coefficient picks).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_gp.functional import robust_accuracy
from lightning_gp.functional.robust import SUITES, robust_outcomes

pytest.importorskip("torchattacks")


def linear_case(n: int = 48, d: int = 12, classes: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, classes)
    with torch.no_grad():
        model.weight.copy_(torch.randn(classes, d, generator=g))
        model.bias.copy_(torch.randn(classes, generator=g) * 0.1)
    x = torch.rand(n, d, generator=g)
    y = model(x).argmax(1)
    y[::6] = (y[::6] + 1) % classes  # a few misclassified samples: never robust
    return model, x, y


def exact_linf_robust(model: nn.Linear, x, y, eps: float) -> torch.Tensor:
    w, b = model.weight.detach().double(), model.bias.detach().double()
    x = x.double()
    lo, hi = (-x).clamp(min=-eps), (1 - x).clamp(max=eps)  # δ_k ∈ [max(−ε, −x_k), min(ε, 1 − x_k)]
    robust = torch.ones(len(y), dtype=torch.bool)
    for j in range(w.shape[0]):
        c = w[y] - w[j]  # (n, d)
        worst = (c * x).sum(1) + (b[y] - b[j]) + torch.where(c > 0, c * lo, c * hi).sum(1)
        robust &= (worst > 0) | (y == j)
    return robust & (model(x.float()).argmax(1) == y)


@pytest.mark.parametrize(("attack", "classes"), [("apgd-ce", 2), ("pgd-20", 2), ("apgd-t", 5)])
def test_each_gradient_attack_finds_the_exact_worst_case_of_a_linear_model(attack, classes):
    """Never stronger than the true worst case (no robust sample is broken) and, on a linear model, equal to it.
    The untargeted attacks ascend the cross-entropy, whose direction mixes the other classes' margins: with two
    classes it is the margin's own; the targeted APGD-T takes each class's margin in turn, so with five."""
    model, x, y = linear_case(classes=classes)
    for eps in (0.02, 0.05):
        want = exact_linf_robust(model, x, y, eps)
        assert 0 < int(want.sum()) < int((model(x).argmax(1) == y).sum())  # both kinds of sample present
        got = robust_accuracy(model, x, y, eps, attacks=[attack])
        assert torch.equal(got, want), (attack, eps, (got != want).nonzero().flatten().tolist())


@pytest.mark.parametrize("attack", ["fab-t", "square"])
def test_fab_and_square_never_break_a_robust_sample_and_find_most_of_the_rest(attack):
    """FAB-T (a minimal-perturbation attack) and Square (random search, no gradient) on the linear model: every
    sample they break is truly breakable, and they find most of them."""
    model, x, y = linear_case(n=24)
    eps = 0.05
    want = exact_linf_robust(model, x, y, eps)
    got = robust_accuracy(model, x, y, eps, attacks=[attack])
    assert bool((got | ~want).all()), "a truly robust sample was counted as broken"
    breakable = (model(x).argmax(1) == y) & ~want
    assert int((breakable & ~got).sum()) >= int(breakable.sum()) * 0.75


def test_the_standard_suite_is_never_above_clean_and_monotone_in_eps():
    model, x, y = linear_case(n=24, seed=1)
    clean = model(x).argmax(1) == y
    accuracies = []
    for eps in (0.0125, 0.025, 0.05):
        out = robust_outcomes(model, x, y, eps, attacks="standard")
        assert torch.equal(out.clean, clean)
        assert bool((out.robust <= out.clean).all())
        assert list(out.after) == list(SUITES["standard"])
        steps = [out.after[a] for a in SUITES["standard"]]
        assert all(bool((b <= a).all()) for a, b in itertools.pairwise(steps))  # cumulative
        assert torch.equal(steps[-1], out.robust)
        assert list(out.seconds) == list(SUITES["standard"]) and 0 < sum(out.seconds.values()) < 600
        assert torch.equal(out.robust, exact_linf_robust(model, x, y, eps))
        accuracies.append(float(out.robust.float().mean()))
    assert accuracies == sorted(accuracies, reverse=True)


def test_l2_and_other_bounds_map_to_the_unit_box():
    """An l2 threat model, and inputs in [-1, 1]: the same outcomes as the same model on [0, 1] inputs with the
    radius halved (the box is mapped affinely onto the unit box)."""
    model, x, y = linear_case(n=24, seed=2)
    shifted = nn.Linear(12, 5)
    with torch.no_grad():  # shifted(2u − 1) = model(u)
        shifted.weight.copy_(model.weight / 2)
        shifted.bias.copy_(model.bias + model.weight.sum(1) / 2)
    for norm, eps in (("l2", 0.3), ("linf", 0.04)):
        a = robust_accuracy(model, x, y, eps, norm=norm, attacks=["apgd-ce", "apgd-t"])
        b = robust_accuracy(shifted, 2 * x - 1, y, 2 * eps, norm=norm, attacks=["apgd-ce", "apgd-t"],
                            bounds=(-1.0, 1.0))
        assert torch.equal(a, b)
        assert int(a.sum()) < int((model(x).argmax(1) == y).sum())  # the attacks broke some


class Mixed(nn.Module):
    """BatchNorm, dropout, a frozen layer and a submodule left in eval mode: what must come back as it was."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.frozen(self.bn(x)))))


def test_the_model_and_the_random_state_are_left_exactly_as_found():
    torch.manual_seed(0)
    model = Mixed().train()
    model.frozen.eval()
    model(torch.rand(16, 12)).sum().backward()  # .grad set, BatchNorm statistics moved
    x, y = torch.rand(16, 12), torch.randint(0, 5, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    modes = {n: m.training for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    robust_accuracy(model, x, y, 0.05, attacks=["apgd-ce", "fab-t"])
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for n, p in model.named_parameters():
        assert (p.grad is None) == (n not in grads) and (p.grad is None or torch.equal(p.grad, grads[n])), n


def test_a_half_precision_model_is_attacked_in_float32_and_not_cast():
    model, x, y = linear_case(n=16)
    half = nn.Linear(12, 5).to(torch.bfloat16)
    with torch.no_grad():
        half.weight.copy_(model.weight)
        half.bias.copy_(model.bias)
    weight, bias = half.weight, half.bias.clone()
    before = half.weight.detach().clone()
    robust_accuracy(half, x, y, 0.05, attacks=["pgd-20"])
    assert half.weight is weight and half.weight.dtype == torch.bfloat16  # the same objects, back in bfloat16
    assert torch.equal(half.weight, before) and torch.equal(half.bias, bias)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(eps=0.0), r"`eps` must be a positive number, got 0.0"),
    (dict(eps=float("nan")), r"`eps`"),
    (dict(attacks=["apgd-cee"]), r"unknown attack 'apgd-cee'.*Did you mean 'apgd-ce'"),
    (dict(attacks="standrd"), r"unknown attack 'standrd'.*Did you mean 'standard'"),
    (dict(attacks=[]), r"`attacks` is empty"),
    (dict(norm="l1"), r"`norm` must be one of"),
    (dict(bounds=None), r"`bounds=None`"),
    (dict(bounds=(0.0, 0.5)), r"`x` must lie inside `bounds` = \(0.0, 0.5\)"),
])
def test_bad_input_is_refused_before_the_first_attack(kwargs, match):
    model, x, y = linear_case(n=8)
    args = dict(eps=0.05) | kwargs
    with pytest.raises(ValueError, match=match):
        robust_accuracy(model, x, y, **args)


def test_a_model_with_one_output_or_labels_out_of_range_is_refused():
    x = torch.rand(4, 3)
    with pytest.raises(ValueError, match=r"at least 2 classes"):
        robust_accuracy(nn.Linear(3, 1), x, torch.zeros(4, dtype=torch.long), 0.1, attacks=["pgd-20"])
    with pytest.raises(ValueError, match=r"labels outside \[0, 3\)"):
        robust_accuracy(nn.Linear(3, 3), x, torch.full((4,), 3), 0.1, attacks=["pgd-20"])
    with pytest.raises(ValueError, match=r"'apgd-t' uses the targeted DLR loss.*3 classes"):
        robust_accuracy(nn.Linear(3, 3), x, torch.zeros(4, dtype=torch.long), 0.1, attacks=["apgd-t"])
