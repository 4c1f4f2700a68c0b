"""Robust accuracy the way papers report it: AutoAttack's standard suite, each sample robust only if it survives all.

AutoAttack (Croce & Hein, ICML 2020) runs APGD-CE, then APGD-T (9 target classes), then FAB-T (9 target classes),
then Square (5000 queries), each on the samples still robust; a sample counts as robust only if every attack fails.
The attacks themselves are torchattacks' ports of the authors' code (``pip install --no-deps torchattacks``: its
torchvision requirement is not needed, and torchvision's wheel breaks ``import torch`` beside the CPU build), run
with the official standard version's settings, which torchattacks' own ``AutoAttack`` does not use (it runs APGD
for 10 iterations, not 100): see ``docs/robust-accuracy.md``. "pgd-20" is this package's own :func:`pgd`.

The model is attacked in eval mode, in float32 and outside autocast, with its parameters' ``requires_grad`` off;
afterwards every submodule's mode, every flag, every ``.grad`` and the global random state are as they were.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_gp.functional._checks import check_batched, check_choice, check_clamp, check_finite, check_tensor
from lightning_gp.functional.adversarial import pgd

RobustNorm = Literal["linf", "l2"]
NORMS = ("linf", "l2")
#: what an ε error adds
EPS_HINT = "Pass the radius of the threat model, e.g. 8/255 (l∞) or 0.5 (l2)."
#: every attack by name, in the order AutoAttack runs them, then the others
ATTACKS = ("apgd-ce", "apgd-t", "fab-t", "square", "pgd-20")
#: the named suites: AutoAttack's standard version, and its two APGD attacks alone
SUITES = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square"), "fast": ("apgd-ce", "apgd-t")}
#: AutoAttack's standard version (fra31/auto-attack, ``version="standard"``)
APGD_STEPS, FAB_STEPS, SQUARE_QUERIES, TARGET_CLASSES = 100, 100, 5000, 9


@dataclass
class RobustOutcome:
    """Per-sample outcomes of one evaluation.

    Attributes:
        clean: True where the clean sample is classified correctly.
        robust: True where it is, and survives every attack.
        after: ``{attack: robust after it}``, cumulative in the order run (AutoAttack's printout).
        seconds: ``{attack: wall-clock seconds it took}``.

    Example:

        >>> model = torch.nn.Linear(4, 3)
        >>> out = robust_outcomes(model, torch.rand(6, 4), torch.randint(0, 3, (6,)), 0.05, attacks=["pgd-20"])
        >>> isinstance(out, RobustOutcome), out.robust.shape, sorted(out.seconds)
        (True, torch.Size([6]), ['pgd-20'])
    """

    clean: Tensor
    robust: Tensor
    after: dict[str, Tensor] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def resolve_attacks(attacks: str | Sequence[str], owner: str | None = None) -> tuple[str, ...]:
    """The attacks a suite name or a list names, in order; an unknown name is refused with the nearest ones."""
    where = f"{owner}: " if owner else ""
    if isinstance(attacks, str):
        if attacks in SUITES:
            return SUITES[attacks]
        attacks = [attacks]
    names = tuple(attacks)
    if not names:
        raise ValueError(f"{where}`attacks` is empty: pass 'standard', 'fast' or a list of {list(ATTACKS)}.")
    for name in names:
        if name not in ATTACKS:
            near = difflib.get_close_matches(str(name), [*SUITES, *ATTACKS], n=1, cutoff=0.5)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{where}`attacks` names an unknown attack {name!r}: choose a suite {list(SUITES)} or "
                             f"attacks from {list(ATTACKS)}.{hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"{where}`attacks` = {list(names)} names an attack twice; each runs once.")
    return names


def check_bounds(bounds: tuple[float, float] | None, owner: str | None = None) -> tuple[float, float]:
    """``bounds`` as a (lo, hi) pair; None is refused: AutoAttack's attacks search a box."""
    if bounds is None:
        raise ValueError(f"{owner + ': ' if owner else ''}`bounds=None`: AutoAttack's attacks search the ε-ball "
                         f"inside the inputs' box; pass the range the inputs live in, e.g. (0.0, 1.0), or "
                         f"(min, max) of the normalized data.")
    return check_clamp(bounds)  # type: ignore[return-value]


def check_inputs_in_bounds(x: Tensor, bounds: tuple[float, float], name: str = "inputs") -> None:
    if x.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(x.detach().float())).tolist()
    if lo < bounds[0] - 1e-6 or hi > bounds[1] + 1e-6:
        raise ValueError(f"`{name}` must lie inside `bounds` = {bounds}, got values in [{lo:g}, {hi:g}]. Pass the "
                         f"range the inputs live in as `bounds` (normalized images are not in [0, 1]).")


class _UnitBox(nn.Module):
    """``model`` seen as torchattacks sees images: u ∈ [0, 1]^(C×H×W) ↦ model(lo + (hi − lo)·u, in the inputs' own
    shape). Any box maps onto the unit box (an ε-ball around x onto the ball of radius ε / (hi − lo) around u, in
    either norm), and any input shape onto 4 dimensions: (B, d) as (B, 1, 1, d), (B, H, W) as (B, 1, H, W)."""

    def __init__(self, model: nn.Module, lo: float, hi: float, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.model, self.lo, self.scale, self.shape = model, lo, hi - lo, shape

    @staticmethod
    def image_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
        if len(shape) == 3:
            return shape
        if len(shape) == 2:
            return (1, *shape)
        return (1, 1, math.prod(shape))

    def forward(self, u: Tensor) -> Tensor:
        x = u.reshape(u.shape[0], *self.shape)
        return self.model(x if (self.lo, self.scale) == (0.0, 1.0) else self.lo + self.scale * x)


@contextlib.contextmanager
def evaluation_state(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode, float32, outside autocast, parameters not requiring grad, the global RNG forked;
    every submodule's mode, every flag, every ``.grad`` and every dtype put back exactly after. A half-precision
    model is cast to float32 in place and back (exact: float32 holds every bfloat16 and float16 value), which keeps
    its parameters the same objects (an optimizer's references stay valid) and copies nothing."""
    params = list(model.parameters())
    modes = [(m, m.training) for m in model.modules()]
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    dtypes = [(m, kind, name, t.dtype) for m in model.modules()
              for kind, tensors in (("p", m.named_parameters(recurse=False)), ("b", m.named_buffers(recurse=False)))
              for name, t in tensors if t.is_floating_point()]
    cast = any(dtype != torch.float32 for *_, dtype in dtypes)
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    try:
        for p in params:
            p.grad = None  # kept aside, untouched by the casts
        if cast:
            model.float()
        with torch.random.fork_rng(devices=devices), torch.autocast("cpu", enabled=False), (
                torch.autocast("cuda", enabled=False) if devices else contextlib.nullcontext()):
            model.eval()
            for p in params:
                p.requires_grad_(False)
            yield model
    finally:
        if cast:
            for m, kind, name, dtype in dtypes:
                t = getattr(m, name)
                if kind == "p":
                    t.data = t.data.to(dtype)  # the same Parameter object, its values exact
                else:
                    setattr(m, name, t.to(dtype))
        for m, mode in modes:
            m.train(mode)
        for p, flag, grad in zip(params, flags, grads, strict=True):
            p.requires_grad_(flag)
            p.grad = grad


def _torchattacks(owner: str):
    try:
        import torchattacks
    except ImportError as err:
        raise ImportError(f"{owner} runs AutoAttack's attacks from torchattacks, which is not installed: "
                          f"`pip install --no-deps torchattacks` (its torchvision requirement is not needed).") from err
    return torchattacks


def _attack(name: str, model: nn.Module, eps: float, norm: RobustNorm, seed: int, n_classes: int,
            owner: str) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x, y) → x_adv`` for attack ``name`` on the unit box, AutoAttack's standard settings."""
    if name == "pgd-20":
        def run(x: Tensor, y: Tensor) -> Tensor:
            gen = torch.Generator(x.device).manual_seed(seed)
            return pgd(lambda u: F.cross_entropy(model(u), y, reduction="sum"), x, epsilon=eps, norm=norm,
                       steps=20, step_size=2.5 * eps / 20, clamp=(0.0, 1.0), generator=gen)
        return run
    ta = _torchattacks(owner)
    if name == "apgd-t" and n_classes < 4:
        raise ValueError(f"{owner}: 'apgd-t' uses the targeted DLR loss, which compares the 4 largest logits: the "
                         f"model has {n_classes} classes. Drop 'apgd-t' from `attacks` (e.g. ['apgd-ce', 'fab-t', "
                         f"'square']).")
    ta_norm = {"linf": "Linf", "l2": "L2"}[norm]
    targets = min(n_classes, TARGET_CLASSES + 1)  # torchattacks attacks n_classes − 1 targets: AutoAttack's 9
    attack = {
        "apgd-ce": lambda: ta.APGD(model, norm=ta_norm, eps=eps, steps=APGD_STEPS, n_restarts=1, seed=seed,
                                   loss="ce", rho=0.75),
        "apgd-t": lambda: ta.APGDT(model, norm=ta_norm, eps=eps, steps=APGD_STEPS, n_restarts=1, seed=seed,
                                   rho=0.75, n_classes=targets),
        "fab-t": lambda: ta.FAB(model, norm=ta_norm, eps=eps, steps=FAB_STEPS, n_restarts=1, seed=seed,
                                multi_targeted=True, n_classes=targets),
        "square": lambda: ta.Square(model, norm=ta_norm, eps=eps, n_queries=SQUARE_QUERIES, n_restarts=1,
                                    seed=seed, p_init=0.8, loss="margin", resc_schedule=False),
    }[name]()
    return attack


def _into_ball(adv: Tensor, u: Tensor, radius: float, norm: RobustNorm) -> Tensor:
    """``adv`` projected onto the ball around ``u`` and the unit box: a no-op for a correct attack, and a guarantee
    that no sample is counted as broken by a point outside the threat model. (Clamping to a box that holds ``u``
    moves no coordinate away from it, so the ball is kept.)"""
    delta = adv.float() - u
    if norm == "linf":
        delta = delta.clamp(-radius, radius)
    else:
        n = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1))
        delta = delta * (radius / n).clamp(max=1.0)
    return (u + delta).clamp(0.0, 1.0)


def robust_outcomes(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: RobustNorm = "linf",
                    attacks: str | Sequence[str] = "standard", seed: int = 0,
                    bounds: tuple[float, float] | None = (0.0, 1.0), batch_size: int | None = None,
                    progress: Callable[[int], object] | None = None,
                    owner: str = "robust_accuracy") -> RobustOutcome:
    """:func:`robust_accuracy` with the clean outcomes, the outcome after each attack and each attack's time.

    Args:
        model: maps inputs to (B, classes) logits; attacked in eval mode and float32, put back as found.
        x: the samples, inside ``bounds``.
        y: their integer labels.
        eps: the threat model's radius.
        norm: "linf" or "l2".
        attacks: a suite ("standard", "fast") or a list of ``ATTACKS``, run in that order.
        seed: seeds every attack.
        bounds: the box the inputs live in.
        batch_size: attack the samples in chunks of this many, one after the other (all at once when None).
        progress: called with the number of samples each attack settles: at its start those broken before
            (not attacked again), then after each chunk its size; the calls add up to ``len(x) × len(attacks)``.
        owner: the name error messages start with.

    Raises:
        ValueError: as :func:`robust_accuracy`.

    Example:

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> out = robust_outcomes(model, x, y, eps=0.05, attacks=["pgd-20"])
        >>> bool((out.robust <= out.clean).all()), list(out.after)
        (True, ['pgd-20'])
    """
    names = resolve_attacks(attacks, owner)
    eps = check_finite(eps, "eps", strict=True, hint=EPS_HINT)
    check_choice(norm, "norm", NORMS, owner)
    lo, hi = check_bounds(bounds, owner)
    x = check_batched(x, "x").detach()
    y = check_tensor(y, "y").detach()
    if y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"`y` must hold one integer class label per sample, shape ({x.shape[0]},), got "
                         f"{tuple(y.shape)} of dtype {y.dtype}.")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"`batch_size` must be a positive int or None, got {batch_size!r}.")
    check_inputs_in_bounds(x, (lo, hi), "x")
    chunk = batch_size or max(x.shape[0], 1)
    # the attacks differentiate: also where the caller runs under no_grad or inference mode (Lightning's
    # validation), on copies of the samples that are not inference tensors
    with torch.inference_mode(False), torch.enable_grad(), evaluation_state(model) as target:
        x, y = x.float().clone(), y.clone()
        with torch.no_grad():
            logits = torch.cat([target(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)]) if len(x) else \
                x.new_zeros(0, 2)
        n_classes = logits.shape[-1] if logits.ndim == 2 else 0
        if n_classes < 2:
            raise ValueError(f"The model's output must be (B, classes) logits with at least 2 classes, got shape "
                             f"{tuple(logits.shape)}: robust accuracy counts misclassified samples.")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= n_classes):
            raise ValueError(f"`y` holds labels outside [0, {n_classes}) (the model has {n_classes} classes).")
        clean = logits.argmax(-1) == y
        robust = clean.clone()
        shape = tuple(x.shape[1:])
        # in eval mode: torchattacks puts a model it found training back in train mode after each attack
        unit = _UnitBox(target, lo, hi, shape).eval()
        u = ((x - lo) / (hi - lo)).reshape(len(x), *_UnitBox.image_shape(shape))
        radius = eps / (hi - lo)
        after, seconds = {}, {}
        for name in names:
            began = time.perf_counter()
            run = _attack(name, unit, radius, norm, seed, n_classes, owner)
            index = robust.nonzero().flatten()
            if progress is not None and len(index) < len(y):
                progress(len(y) - len(index))  # broken before: settled for this attack without a run
            for start in range(0, len(index), chunk):
                part = index[start:start + chunk]
                adv = _into_ball(run(u[part], y[part]).detach(), u[part], radius, norm)
                with torch.no_grad():
                    still = unit(adv).argmax(-1) == y[part]
                robust[part[~still]] = False
                if progress is not None:
                    progress(len(part))
            after[name] = robust.clone()
            seconds[name] = time.perf_counter() - began
    return RobustOutcome(clean, robust, after, seconds)


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps: float, *, norm: RobustNorm = "linf",
                    attacks: str | Sequence[str] = "standard", seed: int = 0,
                    bounds: tuple[float, float] | None = (0.0, 1.0)) -> Tensor:
    """Per-sample robustness under AutoAttack: True where ``x[i]`` is classified correctly and survives every attack.

    Args:
        model: maps inputs to (B, classes) logits; attacked in eval mode and float32, put back as found.
        x: the samples, inside ``bounds``.
        y: their integer labels.
        eps: the threat model's radius (l∞: 8/255 for CIFAR-10, not 0.031; l2: 0.5).
        norm: "linf" or "l2".
        attacks: "standard" (APGD-CE, APGD-T, FAB-T, Square), "fast" (the two APGD), or a list of
            ``ATTACKS`` ("apgd-ce", "apgd-t", "fab-t", "square", "pgd-20"), run in that order.
        seed: seeds every attack, so repeated evaluations are comparable.
        bounds: the box the inputs live in (and the attacks stay in).

    Raises:
        ValueError: ε ≤ 0, an unknown attack (with the nearest name), inputs outside ``bounds``, fewer than 2
            classes, labels that are not class indices.
        ImportError: torchattacks is missing (all but "pgd-20" need it).

    Example:

        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
        >>> x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
        >>> robust = robust_accuracy(model, x, y, eps=0.05, attacks=["pgd-20"])
        >>> robust.shape, robust.dtype
        (torch.Size([8]), torch.bool)
    """
    return robust_outcomes(model, x, y, eps, norm=norm, attacks=attacks, seed=seed, bounds=bounds).robust
