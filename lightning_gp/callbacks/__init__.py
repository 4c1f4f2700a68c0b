"""Lightning callbacks that add gradient penalties or adversarial examples to an unchanged LightningModule.

Each is a thin adapter over :mod:`lightning_gp.functional`; see :mod:`lightning_gp.callbacks._base` for
how the loss is changed (a wrapper around ``training_step``, DDP-safe) and how several callbacks compose.
Modules with manual optimization use :func:`lightning_gp.manual.penalized_loss` instead.
"""

from lightning_gp.callbacks.adversarial import AdversarialTraining
from lightning_gp.callbacks.data_penalty import DataGradientPenalty
from lightning_gp.callbacks.parameter_penalty import ParameterGradientPenalty
from lightning_gp.callbacks.spectral_penalty import SpectralNormPenalty

__all__ = ["AdversarialTraining", "DataGradientPenalty", "ParameterGradientPenalty", "SpectralNormPenalty"]
