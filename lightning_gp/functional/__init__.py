"""Pure-torch math of lightning-gp: penalties, perturbations and norms. No Lightning import here.

Everything the callbacks, the GAN mixin and the monitors compute is defined once in this package; they
are thin adapters over it, so every function here can be used in a plain PyTorch loop as well.
"""

from lightning_gp.functional.adversarial import fgsm, pgd
from lightning_gp.functional.awp import awp_parameters, awp_perturbation
from lightning_gp.functional.gan import (
    difference_penalty,
    interpolate,
    r1_penalty,
    r2_penalty,
    wgan_gradient_penalty,
    wgan_gradient_penalty_fd,
)
from lightning_gp.functional.grad_align import grad_align_penalty
from lightning_gp.functional.grad_norms import (
    GradNormRecorder,
    PerSampleGradNorms,
    linear_squared_norms,
    per_sample_grad_norms,
    per_sample_grad_norms_by_layer,
    per_sample_grad_norms_of_loss,
)
from lightning_gp.functional.gradients import input_gradient, per_sample_norm, per_sample_squared_norm
from lightning_gp.functional.layer_output import output_gradient, per_sample_output_gradient_norms, perturbed_output
from lightning_gp.functional.mart import mart_adversarial, mart_loss, mart_terms
from lightning_gp.functional.mlp_inequality import MLPInequality, chain_layers, mlp_inequality
from lightning_gp.functional.noise_scale import NoiseScale, noise_scale, two_batch_noise_scale
from lightning_gp.functional.penalties import (
    PenaltyGradient,
    data_gradient_penalty,
    data_gradient_penalty_fd,
    gradient_norm_penalty,
    parameter_gradient_penalty,
    parameter_gradient_penalty_fd,
)
from lightning_gp.functional.robust import RobustOutcome, robust_accuracy, robust_outcomes
from lightning_gp.functional.sharpness import hessian_max_eigenvalue, hessian_trace, sam_perturbation
from lightning_gp.functional.spectral import spectral_norm, spectral_norm_penalty
from lightning_gp.functional.trades import trades_adversarial, trades_kl, trades_loss

__all__ = [
    "GradNormRecorder",
    "MLPInequality",
    "NoiseScale",
    "PenaltyGradient",
    "PerSampleGradNorms",
    "RobustOutcome",
    "awp_parameters",
    "awp_perturbation",
    "chain_layers",
    "data_gradient_penalty",
    "data_gradient_penalty_fd",
    "difference_penalty",
    "fgsm",
    "grad_align_penalty",
    "gradient_norm_penalty",
    "hessian_max_eigenvalue",
    "hessian_trace",
    "input_gradient",
    "interpolate",
    "linear_squared_norms",
    "mart_adversarial",
    "mart_loss",
    "mart_terms",
    "mlp_inequality",
    "noise_scale",
    "output_gradient",
    "parameter_gradient_penalty",
    "parameter_gradient_penalty_fd",
    "per_sample_grad_norms",
    "per_sample_grad_norms_by_layer",
    "per_sample_grad_norms_of_loss",
    "per_sample_norm",
    "per_sample_output_gradient_norms",
    "per_sample_squared_norm",
    "perturbed_output",
    "pgd",
    "r1_penalty",
    "r2_penalty",
    "robust_accuracy",
    "robust_outcomes",
    "sam_perturbation",
    "spectral_norm",
    "spectral_norm_penalty",
    "trades_adversarial",
    "trades_kl",
    "trades_loss",
    "two_batch_noise_scale",
    "wgan_gradient_penalty",
    "wgan_gradient_penalty_fd",
]
