"""Lightning callbacks that watch the geometry of training: ‖∇ₓf‖, ‖∇θf‖, the MLP inequality, σ(W),
the Hessian's top eigenvalue, the gradient noise scale, and what each callback costs.

Each is a thin adapter over `lightning_gp.functional`; reductions across DDP ranks use
`lightning_gp.metrics.PerSampleMeanMax`; scalars reach every Lightning logger and W&B also gets
histograms, tables and charts (`lightning_gp._lightning.log_writer`).
"""

from lightning_gp.monitors.cost import CostMonitor
from lightning_gp.monitors.gradient_norm import GradientNormMonitor
from lightning_gp.monitors.mlp_inequality import MLPInequalityMonitor
from lightning_gp.monitors.noise_scale import GradientNoiseScale
from lightning_gp.monitors.sharpness import SharpnessMonitor
from lightning_gp.monitors.spectral_norm import SpectralNormMonitor

__all__ = ["CostMonitor", "GradientNoiseScale", "GradientNormMonitor", "MLPInequalityMonitor", "SharpnessMonitor",
           "SpectralNormMonitor"]
