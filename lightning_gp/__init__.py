"""lightning-gp: gradient-based regularization for PyTorch Lightning.

Layers, each importing only those above it (``tests/test_architecture.py``): ``functional`` (pure torch math, no
Lightning); the shared plumbing beside ``interception`` (batch and site, the step's objective and chain, the log
writer, Lightning's private names); then ``callbacks``, ``monitors``, ``gan`` and ``manual``, thin Lightning
adapters over the math. Design notes: ``docs/design/``.
"""

from lightning_gp import functional, manual
from lightning_gp.callbacks import (
    AdversarialTraining,
    DataGradientPenalty,
    Flooding,
    ParameterGradientPenalty,
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
    "AdversarialTraining",
    "CostMonitor",
    "DataGradientPenalty",
    "Flooding",
    "GradientNoiseScale",
    "GradientNormMonitor",
    "MLPInequalityMonitor",
    "ParameterGradientPenalty",
    "PenaltyMixin",
    "PerSampleMeanMax",
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
