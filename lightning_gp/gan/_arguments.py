"""The WGAN-GP mixin's arguments and networks, checked with errors that name them."""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from torch import nn

from lightning_gp.functional._checks import check_choice, check_number, check_positive_int
from lightning_gp.gan.regularizers import METHODS, REGULARIZERS

#: The mixin's own keyword arguments.
MIXIN_ARGS = ("n_critic", "regularizer", "gp_weight", "clip_value", "reg_every", "lr", "betas", "method")


def explained_unknown_argument(cls_name: str, err: TypeError, kwargs: dict[str, Any]) -> TypeError:
    """``err`` (from the next ``__init__`` of the MRO), or, when it complains about one of ``kwargs``, a TypeError
    that names it and the nearest of the mixin's own arguments."""
    match = re.search(r"unexpected keyword argument '([^']+)'", str(err))
    unknown = match.group(1) if match and match.group(1) in kwargs else None
    if unknown is None:
        return err
    near = difflib.get_close_matches(unknown, MIXIN_ARGS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f". WGANGPMixin's own arguments: {list(MIXIN_ARGS)}."
    return TypeError(f"{cls_name}: unknown argument {unknown!r}{hint}")


def checked_hparams(*, n_critic: Any, regularizer: Any, gp_weight: Any, clip_value: Any, reg_every: Any, lr: Any,
                    betas: Any, method: Any) -> dict[str, Any]:
    """The mixin's hyperparameters, checked and normalised (floats, a tuple of betas).

    Raises:
        ValueError, TypeError: naming the argument, its value and what it must be.
    """
    owner = "WGANGPMixin"
    check_positive_int(n_critic, "n_critic", owner)
    check_choice(regularizer, "regularizer", REGULARIZERS, owner)
    gp_weight = check_number(gp_weight, "gp_weight", owner)
    clip_value = check_number(clip_value, "clip_value", owner, strict=True)
    check_positive_int(reg_every, "reg_every", owner)
    lr = check_number(lr, "lr", owner, strict=True)
    check_choice(method, "method", METHODS, owner)
    if (
        not isinstance(betas, (tuple, list))
        or len(betas) != 2
        or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
    ):
        raise ValueError(f"{owner}(betas={betas!r}): `betas` must be two numbers in [0, 1), got {betas!r}.")
    if not all(math.isfinite(b) for b in betas):
        raise ValueError(f"{owner}(betas={betas!r}): `betas` must be two finite numbers in [0, 1), got {betas!r}.")
    return {
        "n_critic": n_critic,
        "regularizer": regularizer,
        "gp_weight": float(gp_weight),
        "clip_value": float(clip_value),
        "reg_every": reg_every,
        "lr": float(lr),
        "betas": (float(betas[0]), float(betas[1])),  # Adam rejects a mix of int and float
        "method": method,
    }


def check_networks(module: Any, unset_sample_latent: Any) -> None:
    """Raise unless ``module`` set ``generator`` and ``critic`` to modules and overrides ``sample_latent`` (whose
    mixin default is ``unset_sample_latent``).

    Raises:
        AttributeError: a network missing or not an ``nn.Module``.
        NotImplementedError: ``sample_latent`` not defined (its message says what to define).
    """
    for name in ("generator", "critic"):
        if not isinstance(getattr(module, name, None), nn.Module):
            raise AttributeError(
                f"{type(module).__name__} must set `self.{name}` to an nn.Module in `__init__`, got "
                f"{type(getattr(module, name, None)).__name__}."
            )
    if getattr(type(module), "sample_latent", None) is unset_sample_latent:
        module.sample_latent(0)  # raises the NotImplementedError that explains what to define
