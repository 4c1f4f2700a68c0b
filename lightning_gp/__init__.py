"""lightning-gp: gradient-based regularization for PyTorch Lightning.

Rooms, lowest first; each imports only its own and lower ones (``tests/test_architecture.py``):

- ``functional/``: the math, pure torch (no Lightning), usable in a plain PyTorch loop;
- ``_lightning/``: what the adapters know about Lightning (private names, trainer, setup checks, logging);
  ``metrics`` and ``dashboard`` beside it;
- ``step/``: the intercepted training step (interception, the chain of callbacks, the extra pass, sites);
- ``callbacks/``, ``monitors/``, ``gan/``: thin Lightning adapters over the math;
- ``manual``, and this root, which re-exports the public surface.

A leading underscore marks a module outside the public API (it may be imported inside the package, down the
layers). Design notes: ``docs/design/``.
"""

from lightning_gp import functional, manual
from lightning_gp.callbacks import (
    MART,
    TRADES,
    AdversarialTraining,
    AdversarialWeightPerturbation,
    DataGradientPenalty,
    Flooding,
    GradAlign,
    ParameterGradientPenalty,
    RobustAccuracy,
    SharpnessAwareMinimization,
    SpectralNormPenalty,
    VirtualAdversarialTraining,
)
from lightning_gp.gan import WGANGPMixin
from lightning_gp.manual import PenaltyMixin, penalized_loss
from lightning_gp.metrics import PerSampleMeanMax
from lightning_gp.monitors import (
    CostMonitor,
    GradientNoiseScale,
    GradientNormMonitor,
    MLPInequalityMonitor,
    SharpnessMonitor,
    SpectralNormMonitor,
)

__version__ = "0.1.0"

__all__ = [
    "MART",
    "TRADES",
    "AdversarialTraining",
    "AdversarialWeightPerturbation",
    "CostMonitor",
    "DataGradientPenalty",
    "Flooding",
    "GradAlign",
    "GradientNoiseScale",
    "GradientNormMonitor",
    "MLPInequalityMonitor",
    "ParameterGradientPenalty",
    "PenaltyMixin",
    "PerSampleMeanMax",
    "RobustAccuracy",
    "SharpnessAwareMinimization",
    "SharpnessMonitor",
    "SpectralNormMonitor",
    "SpectralNormPenalty",
    "VirtualAdversarialTraining",
    "WGANGPMixin",
    "__version__",
    "functional",
    "manual",
    "penalized_loss",
]
