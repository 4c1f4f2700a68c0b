"""WGAN-GP for Lightning: a mixin with the critic/generator loop and every critic regularizer.

The penalties' math lives in `lightning_gp.functional.gan`; this package is the Lightning adapter.
"""

from lightning_gp.gan.mixin import WGANGPMixin
from lightning_gp.gan.regularizers import (
    METHODS,
    PENALTIES,
    REGULARIZERS,
    PenaltyTerm,
    apply_spectral_normalization,
    check_no_batch_norm,
    clip_weights_,
    critic_penalty,
)

__all__ = [
    "METHODS",
    "PENALTIES",
    "REGULARIZERS",
    "PenaltyTerm",
    "WGANGPMixin",
    "apply_spectral_normalization",
    "check_no_batch_norm",
    "clip_weights_",
    "critic_penalty",
]
