"""lightning-gp: gradient-based regularization for PyTorch Lightning.

Layers: :mod:`lightning_gp.functional` (pure torch math) → metrics → callbacks, the WGAN-GP mixin and
monitors (thin Lightning adapters over the math).
"""

from lightning_gp import functional

__version__ = "0.1.0"

__all__ = ["functional", "__version__"]
