"""Lightning callbacks that add gradient penalties or adversarial examples to an unchanged LightningModule, and
measure its robust accuracy (:class:`RobustAccuracy`).

Each is a thin adapter over `lightning_gp.functional`. How the loss is changed (a wrapper around
``training_step``, DDP-safe) and how several callbacks compose: ``docs/design/loss-changing-callbacks.md``.
Modules with manual optimization use `lightning_gp.manual.penalized_loss` instead.
"""

from lightning_gp.callbacks.adversarial import AdversarialTraining
from lightning_gp.callbacks.awp import AdversarialWeightPerturbation
from lightning_gp.callbacks.data_penalty import DataGradientPenalty
from lightning_gp.callbacks.flooding import Flooding
from lightning_gp.callbacks.grad_align import GradAlign
from lightning_gp.callbacks.mart import MART
from lightning_gp.callbacks.parameter_penalty import ParameterGradientPenalty
from lightning_gp.callbacks.robust_accuracy import RobustAccuracy
from lightning_gp.callbacks.sam import SharpnessAwareMinimization
from lightning_gp.callbacks.spectral_penalty import SpectralNormPenalty
from lightning_gp.callbacks.trades import TRADES
from lightning_gp.callbacks.vat import VirtualAdversarialTraining

__all__ = [
    "MART",
    "TRADES",
    "AdversarialTraining",
    "AdversarialWeightPerturbation",
    "DataGradientPenalty",
    "Flooding",
    "GradAlign",
    "ParameterGradientPenalty",
    "RobustAccuracy",
    "SharpnessAwareMinimization",
    "SpectralNormPenalty",
    "VirtualAdversarialTraining",
]
