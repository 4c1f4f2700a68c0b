"""The layer types the functional layer treats specially, defined once (public torch classes only)."""

from __future__ import annotations

from torch import nn

#: Layers whose ``weight`` is a linear map of the layer's input (conv kernels as their reshaped matrix).
LINEAR_MAP_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
#: The layers :func:`~lightning_gp.functional.spectral_norm_penalty` regularizes: the linear maps and Bilinear.
SPECTRAL_PENALTY_LAYERS: tuple[type[nn.Module], ...] = (*LINEAR_MAP_LAYERS, nn.Bilinear)
