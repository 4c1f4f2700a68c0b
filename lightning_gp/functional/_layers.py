"""The layer types the package treats specially, defined once."""

from __future__ import annotations

from torch import nn

from lightning_gp.functional._torch_private import BatchNormBase, DropoutBase

#: Layers whose ``weight`` is a linear map of the layer's input (conv kernels as their reshaped matrix).
LINEAR_MAP_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)  # fmt: skip
#: The layers :func:`~lightning_gp.functional.spectral_norm_penalty` regularizes: the linear maps and Bilinear.
SPECTRAL_PENALTY_LAYERS: tuple[type[nn.Module], ...] = (*LINEAR_MAP_LAYERS, nn.Bilinear)
#: BatchNorm1d/2d/3d, SyncBatchNorm and their Lazy variants: in training mode they couple a batch's samples.
BATCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (BatchNormBase,)
#: Dropout in all its forms (a pass-through in eval mode).
DROPOUT_LAYERS: tuple[type[nn.Module], ...] = (DropoutBase,)


def batch_norms(module: nn.Module, *, training_only: bool = True) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of the BatchNorm layers in ``module`` (those in training mode with ``training_only``).

    Example:


        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
        >>> [name for name, _ in batch_norms(net)], [name for name, _ in batch_norms(net.eval())]
        (['1'], [])
    """
    return [(name, m) for name, m in module.named_modules()
            if isinstance(m, BATCH_NORM_LAYERS) and (m.training or not training_only)]
