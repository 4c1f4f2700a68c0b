"""WGAN-GP as a LightningModule mixin: manual optimization, n_critic critic steps per generator step.

Why this works under ``strategy="ddp"`` with the default settings (Lightning's own GAN example does not):
DDP's reducer, built with ``find_unused_parameters=False``, expects *every* parameter of the wrapped
LightningModule to receive a gradient in *every* backward pass; it all-reduces a bucket once all its
parameters are ready. In manual optimization Lightning's ``DDPStrategy.pre_backward`` calls
``prepare_for_backward`` before each ``manual_backward``. A critic step never reaches the generator's
parameters (the fake batch is generated without a graph), and ``toggle_optimizer`` makes it worse by
switching ``requires_grad`` off, so their buckets are never reduced and the next training step's DDP
forward raises "... has parameters that were not used in producing the loss" (checked: the mixin without
the term below fails there on 2 CPU ranks). A bucket mixing both networks would leave critic gradients
un-averaged before that. ``find_unused_parameters=True`` avoids the error at the cost of a graph traversal
per backward pass.

The mixin instead adds ``0 · Σ θ[0]`` over every parameter that the step's loss does not reach (StyleGAN2-
ADA's ``0 * output`` trick): every parameter gets a gradient — exactly zero for the idle network — in every
backward, so all buckets reduce, nothing is toggled, and the loss value is unchanged. The optimizer that
steps zeroes its own gradients first, so the other network's zeros (or the critic gradients a generator
step leaves behind) never leak into an update. Only under a multi-process strategy is the term added.

The gradient penalty's ``torch.autograd.grad`` w.r.t. x̂ captures gradients instead of accumulating them,
so it runs no ``AccumulateGrad`` node and fires none of DDP's hooks; the penalty reaches ``.grad`` only
through the ordinary backward of the total loss, where DDP averages it with the rest. The finite-difference
penalty enters through a linear surrogate for the same reason (see :class:`~.regularizers.PenaltyTerm`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gp._compat import merge_initial_hparams
from lightning_gp._logging import should_log
from lightning_gp.functional._checks import (
    check_choice,
    check_non_negative,
    check_per_sample,
    check_positive,
    check_positive_int,
)
from lightning_gp.functional._rng import forked_rng
from lightning_gp.gan.regularizers import (
    METHODS,
    PENALTIES,
    REGULARIZERS,
    Method,
    Regularizer,
    apply_spectral_normalization,
    check_no_batch_norm,
    clip_weights_,
    critic_penalty,
)

_MASK64 = (1 << 64) - 1


def _mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 finalizer over a running hash)."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h & ((1 << 63) - 1)


class WGANGPMixin:
    """WGAN-GP training loop for a LightningModule: ``class MyGAN(WGANGPMixin, L.LightningModule)``.

    Set ``self.generator`` and ``self.critic`` (any ``nn.Module``) and define ``sample_latent(self, n)``.
    Each training batch is one critic step on a fresh real batch (the batch itself, ``batch[0]`` for a
    tuple/list, or what :meth:`real_samples` returns); after every ``n_critic``-th critic step comes one
    generator step. Critic loss E[D(x̃)] − E[D(x)] + λ·penalty, generator loss −E[D(G(z))].

    Args:
        n_critic: critic steps per generator step (the paper's 5).
        regularizer: "gp" (λE[(‖∇D(x̂)‖ − 1)²] at x̂ = αx + (1 − α)x̃, one α per sample), "gp_one_sided"
            (max(0, ‖∇D‖ − 1)²), "r1" / "r2" (E‖∇D‖² on real / fake, zero-centred), "difference"
            (derivative-free (|D(x̂₁) − D(x̂₂)|/‖x̂₁ − x̂₂‖ − 1)²), "weight_clipping" (every critic parameter
            clamped to ±clip_value after each step), "spectral_normalization" (PyTorch's spectral-norm
            parametrization on every Linear/Conv weight of the critic) or "none".
        gp_weight: λ, the penalty's weight.
        clip_value: c of weight clipping.
        reg_every: lazy regularization: the penalty is computed on every ``reg_every``-th critic step only,
            with weight λ·reg_every (StyleGAN2), so its average strength is unchanged.
        lr, betas: Adam's settings for both networks (the paper's 1e-4, (0, 0.9)). Define your own
            ``configure_optimizers`` returning ``(generator_opt, critic_opt)`` to replace them.
        method: "double_backward" (exact) or "finite_difference" (two ordinary passes, no gradient of a
            gradient: for ``torch.compile``d critics and fused attention) for the gradient penalties.

    Steps and ``trainer.global_step``: in Lightning's manual optimization ``global_step`` counts calls to
    ``optimizer.step()`` of *all* optimizers. A batch is one critic step and, every ``n_critic``-th batch, a
    generator step too, so after b batches ``global_step = b + ⌊b / n_critic⌋``, and ``max_steps`` counts
    both (for G generator steps use ``max_steps = G·(n_critic + 1)``). The logger's step axis counts
    batches. The ``wgan/*`` metrics are logged on the batches the Trainer writes logs (every
    ``log_every_n_steps``; ``self.log`` costs about as much as a small critic step), so
    ``trainer.callback_metrics`` holds the values of the latest such batch. :attr:`critic_steps` and
    :attr:`generator_steps` hold the two counts; they are saved with the model's ``state_dict``, so a run
    resumed mid-cycle continues the cycle where it stopped.

    Randomness: z (``sample_latent``) and α (:meth:`sample_alpha`) are drawn with the global RNG
    temporarily seeded from (seed, rank, critic step), then restored. So a resumed run draws exactly what
    the uninterrupted run drew, DDP ranks draw different noise although ``seed_everything`` gives them the
    same seed, and your other randomness (dropout, data order) is not disturbed. The seed is
    ``torch.initial_seed()`` at the first fit, saved in the checkpoint.

    Overriding: call ``super().__init__(**kwargs)`` and, if you define ``setup``, ``super().setup(stage)``
    (it checks the networks and applies spectral normalization before the optimizers are built). Forward
    ``**kwargs`` to the mixin so ``load_from_checkpoint`` can pass the saved hyperparameters back.

    Example::

        >>> import lightning as L
        >>> class ToyGAN(WGANGPMixin, L.LightningModule):
        ...     def __init__(self, **kwargs):
        ...         super().__init__(**kwargs)
        ...         self.generator = torch.nn.Linear(4, 2)
        ...         self.critic = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        ...     def sample_latent(self, n):
        ...         return torch.randn(n, 4, device=self.device)
        >>> gan = ToyGAN(n_critic=2)
        >>> trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
        ...                     enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(gan, torch.utils.data.DataLoader(torch.randn(64, 2), batch_size=8))
        >>> gan.critic_steps, gan.generator_steps, trainer.global_step  # 4 + 2 optimizer steps
        (4, 2, 6)
    """

    def __init__(
        self,
        *args: Any,
        n_critic: int = 5,
        regularizer: Regularizer = "gp",
        gp_weight: float = 10.0,
        clip_value: float = 0.01,
        reg_every: int = 1,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.0, 0.9),
        method: Method = "double_backward",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_positive_int(n_critic, "n_critic")
        check_choice(regularizer, "regularizer", REGULARIZERS)
        check_non_negative(gp_weight, "gp_weight")
        check_positive(clip_value, "clip_value")
        check_positive_int(reg_every, "reg_every")
        check_positive(lr, "lr")
        check_choice(method, "method", METHODS)
        if (
            not isinstance(betas, (tuple, list))
            or len(betas) != 2
            or not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas)
        ):
            raise ValueError(f"`betas` must be two numbers in [0, 1), got {betas!r}.")
        betas = (float(betas[0]), float(betas[1]))  # Adam rejects a mix of int and float
        self.wgan_hparams = {
            "n_critic": n_critic,
            "regularizer": regularizer,
            "gp_weight": float(gp_weight),
            "clip_value": float(clip_value),
            "reg_every": reg_every,
            "lr": float(lr),
            "betas": betas,
            "method": method,
        }
        self._merge_wgan_hparams()
        self.automatic_optimization = False
        self._wgan_critic_steps = 0
        self._wgan_generator_steps = 0
        self._wgan_seed: int | None = None
        self._wgan_touch_unused = False
        self._wgan_idle: dict[tuple[int, ...], list[Tensor]] = {}
        self._wgan_optimizers_checked = False

    # ----------------------------------------------------------------------------------------- user hooks
    def sample_latent(self, n: int) -> Tensor:
        """Return ``n`` latent vectors for the generator (on ``self.device``). Define it in your module."""
        raise NotImplementedError(
            f"{type(self).__name__} must define `sample_latent(self, n)` returning n latent vectors, "
            "e.g. `return torch.randn(n, self.latent_dim, device=self.device)`."
        )

    def real_samples(self, batch: Any) -> Tensor:
        """The real samples of a training batch: ``batch[0]`` for a tuple/list, else ``batch`` itself."""
        return batch[0] if isinstance(batch, (tuple, list)) else batch

    def sample_alpha(self, n: int) -> Tensor:
        """The per-sample interpolation weights α ~ U[0, 1] of x̂ = αx + (1 − α)x̃ (override to inject)."""
        return torch.rand(n, device=self.device)

    # ---------------------------------------------------------------------------------- state and setup
    @property
    def critic_steps(self) -> int:
        """Critic steps taken so far (checkpointed)."""
        return self._wgan_critic_steps

    @property
    def generator_steps(self) -> int:
        """Generator steps taken so far (checkpointed)."""
        return self._wgan_generator_steps

    def get_extra_state(self) -> dict[str, Any]:
        # In the state_dict (not in on_save_checkpoint) so a user's hook override cannot drop it.
        return {
            "critic_steps": self._wgan_critic_steps,
            "generator_steps": self._wgan_generator_steps,
            "seed": self._wgan_seed,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._wgan_critic_steps = int(state.get("critic_steps", 0))
        self._wgan_generator_steps = int(state.get("generator_steps", 0))
        self._wgan_seed = state.get("seed", self._wgan_seed)

    def _merge_wgan_hparams(self) -> None:
        # A user's own `save_hyperparameters()` replaces hparams; put the mixin's back (theirs win).
        merge_initial_hparams(self, self.wgan_hparams)

    def setup(self, stage: str) -> None:
        """Check the networks, and apply spectral normalization before the optimizers are built."""
        super_setup = getattr(super(), "setup", None)
        if super_setup is not None:
            super_setup(stage)
        for name in ("generator", "critic"):
            if not isinstance(getattr(self, name, None), nn.Module):
                raise AttributeError(
                    f"{type(self).__name__} must set `self.{name}` to an nn.Module in `__init__`, got "
                    f"{type(getattr(self, name, None)).__name__}."
                )
        if getattr(type(self), "sample_latent", None) is WGANGPMixin.sample_latent:
            self.sample_latent(0)  # raises the NotImplementedError that explains what to define
        check_no_batch_norm(self.critic)
        if self.wgan_hparams["regularizer"] == "spectral_normalization":
            apply_spectral_normalization(self.critic)
        if self._wgan_seed is None:
            self._wgan_seed = torch.initial_seed()
        trainer = self._wgan_trainer()
        self._wgan_touch_unused = trainer is not None and trainer.world_size > 1
        self._wgan_idle: dict[tuple[int, ...], list[Tensor]] = {}
        self._merge_wgan_hparams()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """Adam(lr, betas) for the generator and for the critic, in that order."""
        lr, betas = self.wgan_hparams["lr"], self.wgan_hparams["betas"]
        return (
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(self.critic.parameters(), lr=lr, betas=betas),
        )

    @contextlib.contextmanager
    def _wgan_rng(self, stream: int) -> Iterator[None]:
        """Seed the global RNG from (seed, rank, critic step, stream) for the block, then restore it."""
        seed = self._wgan_seed if self._wgan_seed is not None else torch.initial_seed()
        with forked_rng(self.device, seed=_mix_seed(seed, self.global_rank, self._wgan_critic_steps, stream)):
            yield

    def _wgan_trainer(self) -> Any:
        """The Trainer the module is attached to, or None (``self.trainer`` raises when there is none)."""
        try:
            return self.trainer
        except (RuntimeError, AttributeError):
            return None

    def _wgan_optimizers(self) -> tuple[Any, Any]:
        optimizers = self.optimizers()
        if not isinstance(optimizers, (list, tuple)) or len(optimizers) != 2:
            raise ValueError(
                "`configure_optimizers` of a WGANGPMixin module must return two optimizers, "
                f"(generator_opt, critic_opt), got {type(optimizers).__name__}."
            )
        opt_g, opt_c = optimizers
        if not self._wgan_optimizers_checked:
            critic_ids = {id(p) for p in self.critic.parameters()}
            in_critic_opt = {id(p) for group in opt_c.param_groups for p in group["params"]}
            if not critic_ids & in_critic_opt:
                raise ValueError(
                    "The second optimizer from `configure_optimizers` holds none of the critic's "
                    "parameters: return them in the order (generator_opt, critic_opt)."
                )
            self._wgan_optimizers_checked = True
        return opt_g, opt_c

    def _latent(self, n: int) -> Tensor:
        z = self.sample_latent(n)
        if not isinstance(z, Tensor) or z.ndim == 0 or z.shape[0] != n:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"`sample_latent({n})` must return {n} latent vectors (a tensor with leading dimension {n}), "
                f"got {shape}."
            )
        return z

    def _touch(self, *used: nn.Module) -> Tensor | int:
        """0 · Σ θ[0] over the parameters the step's loss does not reach (see the module docstring)."""
        if not self._wgan_touch_unused:
            return 0
        key = tuple(id(module) for module in used)
        idle = self._wgan_idle.get(key)
        if idle is None:  # the set of parameters is fixed once training runs: compute it once per step kind
            reached = {id(p) for module in used for p in module.parameters()}
            idle = [p for p in self.parameters() if p.requires_grad and id(p) not in reached]
            self._wgan_idle[key] = idle
        if not idle:
            return 0
        return torch.stack([p.reshape(-1)[0].float() for p in idle]).sum() * 0

    def _wgan_should_log(self) -> bool:
        # `self.log` costs about as much as a small critic step, so log only on the batches whose metrics
        # the Trainer writes to its loggers (every `log_every_n_steps`), as Lightning itself would.
        return should_log(self._wgan_trainer())

    def _log(self, name: str, value: Tensor) -> None:
        self.log(f"wgan/{name}", value.detach().float(), on_step=True, on_epoch=False, prog_bar=False)

    # ------------------------------------------------------------------------------------------ the loop
    def training_step(self, batch: Any, batch_idx: int) -> None:
        """One critic step on this batch; a generator step after every ``n_critic``-th critic step."""
        opt_g, opt_c = self._wgan_optimizers()
        real = self.real_samples(batch)
        if not isinstance(real, Tensor):
            raise TypeError(
                f"`real_samples(batch)` must return a tensor of real samples, got {type(real).__name__}. "
                "Override `real_samples` for batches that are not a tensor or a (samples, ...) tuple."
            )
        self.critic_step(real, opt_c)
        if self._wgan_critic_steps % self.wgan_hparams["n_critic"] == 0:
            self.generator_step(real.shape[0], opt_g)

    def critic_step(self, real: Tensor, optimizer: Any) -> Tensor:
        """One critic update on ``real``; returns the critic loss (detached)."""
        hp = self.wgan_hparams
        n = real.shape[0]
        name = hp["regularizer"]
        regularize = name in PENALTIES and self._wgan_critic_steps % hp["reg_every"] == 0
        log = self._wgan_should_log()
        with self._wgan_rng(stream=0):
            z = self._latent(n)
            alphas = (self.sample_alpha(n), self.sample_alpha(n)) if regularize else (None, None)
        with torch.no_grad():  # the critic step trains the critic only: no graph through G
            fake = self.generator(z)
        if fake.shape != real.shape:
            raise ValueError(
                f"The generator's output has shape {tuple(fake.shape)} but the real samples have shape "
                f"{tuple(real.shape)}: `generator(sample_latent(n))` must produce samples like the data's."
            )
        d_real = check_per_sample(self.critic(real), n, "critic(real)")
        d_fake = check_per_sample(self.critic(fake), n, "critic(fake)")
        wasserstein = d_real.mean() - d_fake.mean()
        loss = -wasserstein
        logged = loss.detach()
        if regularize:
            term = critic_penalty(
                name,
                self.critic,
                real,
                fake,
                method=hp["method"],
                alpha=alphas[0],
                alpha2=alphas[1],
                track_grad_norm=log,
            )
            weight = hp["gp_weight"] * hp["reg_every"]
            loss = loss + weight * term.loss
            logged = logged + weight * term.value
            if log:
                self._log("penalty", term.value)
                if term.grad_norm is not None:
                    self._log("critic_grad_norm", term.grad_norm)
        optimizer.zero_grad()
        self.manual_backward(loss + self._touch(self.critic))
        optimizer.step()
        if name == "weight_clipping":
            clip_weights_(self.critic, hp["clip_value"])
        self._wgan_critic_steps += 1
        if log:
            self._log("critic_loss", logged)
            self._log("wasserstein_estimate", wasserstein)
        return logged

    def generator_step(self, n: int, optimizer: Any) -> Tensor:
        """One generator update on ``n`` fresh latent vectors; returns −E[D(G(z))] (detached)."""
        with self._wgan_rng(stream=1):
            z = self._latent(n)
        d_fake = check_per_sample(self.critic(self.generator(z)), n, "critic(generator(z))")
        loss = -d_fake.mean()
        optimizer.zero_grad()
        # The critic's parameters get gradients here too (DDP needs every parameter in every backward);
        # the critic optimizer zeroes them before its next step.
        self.manual_backward(loss + self._touch(self.generator, self.critic))
        optimizer.step()
        self._wgan_generator_steps += 1
        if self._wgan_should_log():
            self._log("generator_loss", loss)
        return loss.detach()


__all__ = ["WGANGPMixin"]
