"""The precision a pass really runs in, and difference steps that survive it.

A finite difference f(x + h·d) − f(x) loses the digits that ``x + h·d`` and f's own rounding cannot hold: its
relative error is about ε/h from rounding plus O(h) from truncation, ε the unit roundoff of the dtype the pass
computes in. That dtype is the autocast dtype where autocast is on (a float32 input under ``bf16-mixed`` is
rounded to bfloat16 by the first matmul), not the input's. Design: ``docs/design/finite-differences.md``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["compute_dtype", "default_step", "difference_scale", "difference_step"]

#: Each kind of finite difference: its relative step in float32, and the power of ε it keeps to in a less precise
#: dtype (:func:`difference_step`). Measured (``tests/functional/test_precision.py``): the data penalty's one-sided
#: input difference ε^(2/3), the parameter penalty's one-sided parameter difference ε, a central Hessian-vector
#: difference ε^(1/2) (bf16: 0.088, cos 0.9997 against the double backward, where 1e-3 gave cos 0.54 and a norm
#: 1.8× too large).
STEPS: dict[str, tuple[float, float]] = {"input": (1e-2, 2 / 3), "parameter": (1e-3, 1.0), "hvp": (1e-3, 1 / 2)}


def compute_dtype(t: Tensor) -> torch.dtype:
    """The least precise of ``t.dtype`` and the autocast dtype active on ``t``'s device.

    Example:


        >>> compute_dtype(torch.zeros(2))
        torch.float32
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     compute_dtype(torch.zeros(2))
        torch.bfloat16
    """
    dtype = t.dtype
    if not dtype.is_floating_point:
        return dtype
    device = t.device.type
    if torch.is_autocast_enabled(device):
        cast = torch.get_autocast_dtype(device)
        if torch.finfo(cast).eps > torch.finfo(dtype).eps:
            return cast
    return dtype


def difference_scale(dtype: torch.dtype) -> float:
    """ε^(1/3) of ``dtype``: a relative step whose rounding and truncation errors stay small together.

    ε/h + h is smallest at h = √ε for an exact f, but the step must also survive the rounding of the
    perturbed point itself (bfloat16 keeps 8 bits): ε^(1/3) measured better in bfloat16 and as well in
    float32 (``tests/functional/test_precision.py``). About 4.9e-3 for float32, 6.1e-6 for float64, 0.2 for bfloat16.

    Example:


        >>> round(difference_scale(torch.float32), 4)
        0.0049
    """
    return float(torch.finfo(dtype).eps) ** (1 / 3)


def difference_step(base: float, dtype: torch.dtype, exponent: float) -> float:
    """A finite difference's relative step for passes computing in ``dtype``: ``base`` (its float32 setting), or
    ε^exponent where that is larger.

    A step below the rounding of the gradients it differences measures rounding: in bfloat16 the parameter
    penalty's term came out at cos 0.81 to the exact one with its float32 step 1e-3. The exponents are measured
    (``tests/functional/test_precision.py``): ε for the parameter penalty (bf16: 0.0078, cos 0.99, norm within
    2 %), whose truncation error grows fast with the step, and ε^(2/3) for the data penalty (bf16: 0.039, cos 0.998).

    Example:


        >>> difference_step(1e-3, torch.float32, 1.0), round(difference_step(1e-2, torch.bfloat16, 2 / 3), 3)
        (0.001, 0.039)
    """
    return max(base, float(torch.finfo(dtype).eps) ** exponent)


def default_step(kind: Literal["input", "parameter", "hvp"], dtype: torch.dtype) -> float:
    """The relative step every finite difference of ``kind`` in the package takes by default in ``dtype``: the
    callbacks', the functional penalties', the GAN's and the sharpness monitor's alike (:data:`STEPS`).

    Example:


        >>> default_step("parameter", torch.float32), default_step("parameter", torch.bfloat16)
        (0.001, 0.0078125)
    """
    if kind not in STEPS:
        raise ValueError(f"default_step: `kind` must be one of {list(STEPS)}, got {kind!r}.")
    base, exponent = STEPS[kind]
    return difference_step(base, dtype, exponent)
